"""What the service's APIs take and give: the image input and the JSON schemas."""

from __future__ import annotations

import base64
import binascii
import contextvars
import typing as t

import numpy as np
from bentoml.exceptions import BadInput
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .errors import InvalidImage, UnsupportedMediaType
from .labels import top_k
from .legacy import JSON, Image
from .preprocessing import SUPPORTED_FORMAT_NAMES, SUPPORTED_MEDIA_TYPES, DecodeLimits, read_image, signature_format

if t.TYPE_CHECKING:
    from bentoml.grpc.v1 import service_pb2 as pb

# Both doors set them per request: HTTP from ``?top_k=`` and ``?version=``, gRPC from
# the ``top_k`` and ``version`` metadata keys (see ``guards``).
requested_top_k: contextvars.ContextVar[int | None] = contextvars.ContextVar("requested_top_k", default=None)
requested_version: contextvars.ContextVar[int | None] = contextvars.ContextVar("requested_version", default=None)


# OpenAPI 3.0 "example"s: what the Swagger UI shows as the example value (it does not
# read JSON Schema's "examples" lists).
PREDICTION_EXAMPLE = {
    "label": "Siamese cat",
    "score": 0.93,
    "top_k": [
        {"label": "Siamese cat", "score": 0.93},
        {"label": "Egyptian cat", "score": 0.03},
        {"label": "tabby", "score": 0.01},
    ],
    "version": 1,
}


class ScoredLabel(BaseModel):
    label: str = Field(examples=["Siamese cat"])
    score: float = Field(ge=0, le=1, examples=[0.93])


class Prediction(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": PREDICTION_EXAMPLE})

    label: str = Field(description="the most probable class", examples=["Siamese cat"])
    score: float = Field(ge=0, le=1, description="its softmax probability", examples=[0.93])
    top_k: list[ScoredLabel] = Field(description="the k most probable classes, best first")
    version: int = Field(description="the model version that classified the image", examples=[1])
    warning: str | None = Field(
        default=None, description="set when the labels are not to be trusted: the model has random weights"
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"images": ["/9j/4AAQSkZJRgABAQ..."], "top_k": 3}})

    images: list[str] = Field(
        min_length=1,
        description="base64 image files (standard or URL-safe alphabet)",
        examples=[["/9j/4AAQSkZJRgABAQ..."]],
    )
    top_k: int | None = Field(default=None, ge=1, le=1000, examples=[5])
    version: int | None = Field(default=None, ge=0, description="the model version to ask (default: the newest)")


class BatchPrediction(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"predictions": [PREDICTION_EXAMPLE]}})

    predictions: list[Prediction]


class ImageUpload(Image, proto_fields=Image.proto_fields):
    """``bentoml.io.Image`` that validates and preprocesses in the API worker.

    It returns the model's input (``preprocessing.read_image``: uint8 pixels)
    instead of a PIL image, answers bad input
    with 4xx instead of 500, and keeps ``Image``'s OpenAPI schema and client spec.
    """

    def __init__(self, limits: DecodeLimits) -> None:
        # PNG: what BentoML's client encodes images as before sending them (lossless).
        super().__init__(mime_type="image/png", allowed_mime_types=SUPPORTED_MEDIA_TYPES)
        self.limits = limits

    async def from_http_request(self, request: Request) -> np.ndarray:  # type: ignore[override]
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            data = await read_uploaded_file(request)
        elif media_type.startswith("image/") or media_type == "application/octet-stream":
            data = await request.body()
        else:
            raise UnsupportedMediaType(
                f"Content-Type {media_type or '(none)'} is not an image: "
                f"send one of {', '.join(SUPPORTED_MEDIA_TYPES)} or multipart/form-data"
            )
        return await read_image(data, self.limits)

    async def from_proto(self, field: pb.File | bytes) -> np.ndarray:  # type: ignore[override]
        data = field if isinstance(field, bytes) else field.content
        return await read_image(data, self.limits)


async def read_uploaded_file(request: Request) -> bytes:
    """The file of a multipart form (as the Swagger UI sends it); a malformed form is a 400."""
    try:
        async with request.form(max_files=1, max_fields=8) as form:
            uploads = [value for value in form.values() if not isinstance(value, str)]
            if not uploads:
                raise InvalidImage("multipart form has no file: upload the image as a file field")
            return await uploads[0].read()
    except HTTPException as error:  # Starlette's answer to a form it cannot parse
        raise InvalidImage(f"malformed multipart form: {error.detail}") from None


# Not registered under its own id: clients rebuild a plain ``bentoml.io.Image`` from its spec.
ImageUpload.descriptor_id = Image.descriptor_id


class JsonInput(JSON, proto_fields=JSON.proto_fields):
    """``bentoml.io.JSON`` that answers every unparsable body with 400, and a body its
    model refuses with one line: each field and what is wrong with it.

    BentoML's answers bytes that are not UTF-8, JSON nested too deep for the
    parser, an integer too long for ``int`` or a NaN in a gRPC Struct with 500,
    and a refused body with pydantic's whole report (a line per field, the input
    echoed, a link to pydantic's documentation).
    """

    async def from_http_request(self, request: Request) -> t.Any:
        try:
            return await super().from_http_request(request)
        except (ValueError, RecursionError) as error:  # not UTF-8, an integer of over 4300 digits
            raise BadInput(f"Invalid JSON input received: {type(error).__name__}: {error}") from None
        except BadInput as error:
            raise refused_fields(error) from None

    async def from_proto(self, field: t.Any) -> t.Any:
        try:
            return await super().from_proto(field)
        except ValueError as error:  # a NaN or an infinity in a protobuf Struct, which JSON cannot hold
            raise BadInput(f"Invalid JSON input received: {error}") from None
        except BadInput as error:
            raise refused_fields(error) from None


def refused_fields(error: BadInput) -> BadInput:
    """BentoML's error for a body the model refused (pydantic's report is its context), in one line."""
    report = error.__context__
    if not isinstance(report, ValidationError):
        return error
    problems = (
        "the body should be a JSON object"  # not pydantic's "a valid dictionary or instance of BatchRequest"
        if problem["type"] == "model_type"
        else f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}"
        for problem in report.errors(include_url=False, include_input=False)
    )
    return BadInput(f"Invalid JSON input received: {'; '.join(problems)}")


JsonInput.descriptor_id = JSON.descriptor_id


URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
BASE64_WHITESPACE = b" \t\n\r\v\f"  # skipped anywhere, as TF Serving's decoder (Abseil's) skips it


def decode_base64_image(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional (TensorFlow Serving clients send either),
    line breaks allowed (``base64``'s output wraps at 76 columns)."""
    try:
        cleaned = text.encode("ascii").translate(URL_SAFE_TO_STANDARD, BASE64_WHITESPACE)
        return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):  # ValueError: UnicodeEncodeError, text that is not ASCII
        raise InvalidImage("image is not valid base64") from None


def image_from_tensor_element(value: bytes) -> bytes:
    """A string tensor's element (TF Serving DT_STRING, Open Inference BYTES): an image file or its base64 text.

    Bytes that are not ASCII cannot be base64: they go to the decoder as a file, which
    names what is wrong with them as it does for ``/predict``'s body (a TIFF, a cut JPEG).
    ASCII that is not base64 either may be a text file (SVG, PGM): the error names both.
    """
    if signature_format(value) is not None or not value.isascii():
        return value
    try:
        return decode_base64_image(value.decode("ascii"))
    except InvalidImage:
        raise InvalidImage(f"an image must be base64 text or a {SUPPORTED_FORMAT_NAMES} file") from None


def json_value_to_image(value: t.Any, input_name: str) -> bytes:
    """A string tensor's element in JSON: base64 text, or TF Serving's ``{"b64": ...}``."""
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        return image_from_tensor_element(decode_base64_image(value["b64"]))
    if isinstance(value, str):
        return image_from_tensor_element(value.encode("ascii", "replace"))
    raise InvalidImage(f"each '{input_name}' value must be a base64 string or {{\"b64\": ...}}")


def to_prediction(
    probabilities: np.ndarray, class_names: list[str], k: int, version: int, warning: str | None = None
) -> Prediction:
    ranked = [ScoredLabel(label=label, score=score) for label, score in top_k(probabilities, class_names, k)]
    return Prediction(label=ranked[0].label, score=ranked[0].score, top_k=ranked, version=version, warning=warning)
