"""The Open Inference Protocol (KServe v2) on the same servers and the same runner.

Triton, KServe, Seldon MLServer and OpenVINO Model Server speak it, so their
clients (``tritonclient.http``, ``tritonclient.grpc``, KServe's SDK) work unchanged.
REST is mounted at ``/v2`` on the HTTP server; ``inference.GRPCInferenceService``
is added to the gRPC server.

The model takes one input, ``image``: a BYTES tensor of shape ``[n]`` whose
elements are image files (JPEG, PNG, WebP, BMP, GIF). Through the binary tensor
data extension (``tritonclient``'s default) and gRPC's ``raw_input_contents``
each element is the file itself, after Triton's 4-byte little-endian length;
in JSON ``data`` (and gRPC ``bytes_contents``) an element may also be base64
text (standard or URL-safe), and in JSON TF Serving's ``{"b64": "..."}``. It
answers ``label`` (BYTES ``[n]``, the top-1 class) and ``probabilities`` (FP32
``[n, 1000]``); a model with random weights adds a ``warning`` response parameter.
Triton's classification extension (``"classification": K`` on
an output) turns ``probabilities`` into BYTES ``[n, K]`` of ``"score:index:label"``,
the score printed as C++'s ``std::to_string`` prints a float, as Triton does.

The generated protobuf modules are ``tritonclient``'s own (2.66.0, the last built
for protobuf 5): the service and Triton's client share one definition, so both can
live in one process (a second ``inference`` package in protobuf's default pool
would collide with the client's), and gRPC reflection describes the service.
Only the protocol's six RPCs are served; Triton's others (model repository,
statistics, shared memory) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import json
import struct
import typing as t
from dataclasses import dataclass

import bentoml
import grpc
import numpy as np
from bentoml.exceptions import BadInput, BentoMLException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tritonclient.grpc import service_pb2 as pb

from .. import openapi, versions
from ..api import image_from_tensor_element, json_value_to_image
from ..availability import RunnerUnavailable
from ..errors import ModelNotFound
from ..labels import NUM_CLASSES, top_k_indices
from . import Door, VersionedModel

if t.TYPE_CHECKING:
    from ..classifier import Classifier

REST_PREFIX = "/v2"
GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
INPUT_NAME = "image"
LABEL = "label"
PROBABILITIES = "probabilities"
OUTPUT_SHAPES = {LABEL: ("BYTES", [-1]), PROBABILITIES: ("FP32", [-1, NUM_CLASSES])}
EXTENSIONS = ["binary_tensor_data", "classification"]
WARNING = "warning"  # a response parameter, set when the labels are not to be trusted (random weights)
HEADER_LENGTH = "Inference-Header-Content-Length"
LENGTH_PREFIX = struct.Struct("<I")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0  # K > 0: the top K classes as "score:index:label" strings
    binary: bool = False  # REST only: in the binary section instead of the JSON


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray | list[bytes]

    def raw(self) -> bytes:
        """The binary tensor data extension's (and gRPC's raw contents') layout."""
        if isinstance(self.value, np.ndarray):
            return self.value.astype("<f4").tobytes()
        return b"".join(LENGTH_PREFIX.pack(len(item)) + item for item in self.value)

    def json_data(self) -> list[t.Any]:
        if isinstance(self.value, np.ndarray):
            return self.value.ravel().tolist()
        return [item.decode() for item in self.value]


def split_bytes_elements(raw: bytes) -> list[bytes]:
    """A BYTES tensor's raw contents: each element after its 4-byte little-endian length."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + LENGTH_PREFIX.size > len(raw):
            raise BadInput(f"input '{INPUT_NAME}': BYTES contents end inside an element's 4-byte length")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise BadInput(f"input '{INPUT_NAME}': an element's length ({length}) runs past the contents")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def check_input(name: t.Any, datatype: t.Any, shape: t.Any, count: int) -> None:
    if name != INPUT_NAME:
        raise BadInput(f"unexpected inference input '{name}' for model: the model's only input is '{INPUT_NAME}'")
    if datatype != "BYTES":
        raise BadInput(f"input '{INPUT_NAME}' must have datatype BYTES (image files), got {datatype}")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 1
        or not isinstance(shape[0], int)
        or isinstance(shape[0], bool)
    ):
        raise BadInput(f"input '{INPUT_NAME}' must have shape [n] (one image file per element), got {shape}")
    if shape[0] != count:
        raise BadInput(f"input '{INPUT_NAME}' has shape {list(shape)} but {count} elements")
    if count == 0:
        raise BadInput(f"input '{INPUT_NAME}' is empty: send at least one image")


class ServedModel(VersionedModel):
    """The model as Open Inference clients see it, whatever the wire."""

    def __init__(
        self,
        name: str,
        classifier: Classifier,
        ready: t.Callable[[], t.Awaitable[bool]],
    ) -> None:
        super().__init__(name, classifier)
        self.ready = ready

    def check(self, name: str, version: str = "") -> int | None:
        """The version asked for (None: the newest)."""
        if name != self.name:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if version == "":
            return None
        if (number := versions.parse_number(version)) is None:
            raise self.not_found(version)
        return number

    def not_found(self, version: int | str | None) -> ModelNotFound:
        return ModelNotFound(f"Request for unknown model: '{self.name}' version {version} is not found")

    async def unready(self, version: int | None) -> str | None:
        """Why ``version`` (None: the newest) cannot answer now; None when it can."""
        if not await self.ready():
            return RunnerUnavailable().message
        try:
            await self.available(version)
        except ModelNotFound as error:
            return error.message
        return None

    async def metadata(self, version: int | None) -> dict[str, t.Any]:
        async with self.versioned(version):
            available = await self.classifier.available_versions()
            engine = self.classifier.pick(available, version)["engine"]
        return {
            "name": self.name,
            "versions": [str(s["version"]) for s in available],
            "platform": f"{engine['engine']}_{engine['precision']}",  # what runs it here, as Triton names backends
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": name, "datatype": datatype, "shape": shape}
                for name, (datatype, shape) in OUTPUT_SHAPES.items()
            ],
        }

    def check_outputs(self, requested: list[RequestedOutput]) -> None:
        for output in requested:
            if output.name not in OUTPUT_SHAPES:
                raise BadInput(f"unexpected inference output '{output.name}' for model '{self.name}'")
            if output.classification and OUTPUT_SHAPES[output.name][0] == "BYTES":
                raise BadInput("class result not available for output due to unsupported type 'BYTES'")

    async def infer(
        self, images: list[bytes], requested: list[RequestedOutput], version: int | None
    ) -> tuple[list[Output], str, dict[str, str]]:
        """The outputs, the version that answered, and the response's parameters (a random model's warning)."""
        self.check_outputs(requested)
        classified = await self.classifier.classify_tensor_elements(images, version)
        wanted = requested or map(RequestedOutput, OUTPUT_SHAPES)
        outputs = [self.output(request, classified.probabilities) for request in wanted]
        return outputs, str(classified.version), {WARNING: classified.warning} if classified.warning else {}

    def output(self, request: RequestedOutput, probabilities: np.ndarray) -> Output:
        n = len(probabilities)
        if request.name == LABEL:
            labels = [self.classifier.class_names[top_k_indices(row, 1)[0]].encode() for row in probabilities]
            return Output(LABEL, "BYTES", [n], labels)
        if request.classification:
            k = min(request.classification, NUM_CLASSES)
            classes = [
                f"{row[i]:f}:{i}:{self.classifier.class_names[i]}".encode()
                for row in probabilities
                for i in top_k_indices(row, k)
            ]
            return Output(PROBABILITIES, "BYTES", [n, k], classes)
        return Output(PROBABILITIES, "FP32", [n, NUM_CLASSES], probabilities)


# --- REST ----------------------------------------------------------------------


def object_field(body: dict[str, t.Any], key: str) -> dict[str, t.Any]:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise BadInput(f'"{key}" must be a JSON object')
    return value


def classification_count(parameters: dict[str, t.Any]) -> int:
    value = parameters.get("classification", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadInput(f'"classification" must be a non-negative integer, got {value!r}')
    return value


def flattened(data: t.Any) -> list[t.Any]:
    """JSON tensor data, flat or nested row-major."""
    if not isinstance(data, list):
        raise BadInput(f"input '{INPUT_NAME}': \"data\" must be a list")
    flat: list[t.Any] = []
    pending = [iter(data)]
    while pending:
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            flat.append(item)
        else:
            pending.pop()
    return flat


def rest_images(body: dict[str, t.Any], binary: bytes) -> list[bytes]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput(f'"inputs" must be a list of one tensor, "{INPUT_NAME}"')
    tensor = inputs[0]
    size = object_field(tensor, "parameters").get("binary_data_size")
    if size is None:
        values = flattened(tensor.get("data"))
        check_input(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), len(values))
        return [json_value_to_image(value, INPUT_NAME) for value in values]
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise BadInput(f"input '{INPUT_NAME}': binary_data_size {size!r} does not match the {len(binary)} bytes sent")
    elements = split_bytes_elements(binary)
    check_input(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), len(elements))
    return [image_from_tensor_element(element) for element in elements]


def rest_outputs(body: dict[str, t.Any]) -> list[RequestedOutput]:
    binary_default = object_field(body, "parameters").get("binary_data_output", False) is True
    outputs = body.get("outputs")
    if outputs is None:
        return [RequestedOutput(name, binary=binary_default) for name in OUTPUT_SHAPES]
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise BadInput('"outputs" must be a list of objects with a "name"')
    requested = []
    for output in outputs:
        parameters = object_field(output, "parameters")
        binary = parameters.get("binary_data", binary_default) is True
        requested.append(RequestedOutput(output["name"], classification_count(parameters), binary))
    return requested


def rest_response(
    model: ServedModel,
    version: str,
    parameters: dict[str, str],
    body: dict[str, t.Any],
    outputs: list[Output],
    binary: set[str],
) -> Response:
    header: dict[str, t.Any] = {"model_name": model.name, "model_version": version}
    if isinstance(body.get("id"), str):
        header["id"] = body["id"]
    if parameters:
        header["parameters"] = parameters
    header["outputs"] = []
    chunks = []
    for output in outputs:
        tensor: dict[str, t.Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if output.name in binary:
            chunks.append(output.raw())
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            tensor["data"] = output.json_data()
        header["outputs"].append(tensor)
    if not chunks:
        return JSONResponse(header)
    encoded = json.dumps(header).encode()
    return Response(
        encoded + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(encoded))},
    )


def split_body(raw: bytes, header_length: str | None) -> tuple[dict[str, t.Any], bytes]:
    """The JSON request header and, with the binary tensor data extension, the bytes after it."""
    if header_length is None:
        header, binary = raw, b""
    elif (length := versions.parse_number(header_length)) is not None and length <= len(raw):
        header, binary = raw[:length], raw[length:]
    else:
        raise BadInput(f"{HEADER_LENGTH} {header_length!r} does not fit a {len(raw)}-byte body")
    try:
        body = json.loads(header)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise BadInput(f"request header is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadInput("request header must be a JSON object")
    return body, binary


def rest_app(model: ServedModel, server_metadata: dict[str, t.Any]) -> Starlette:
    def answers(handler: t.Callable[[Request], t.Awaitable[Response]]) -> t.Callable[[Request], t.Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except BentoMLException as exc:
                return JSONResponse({"error": exc.message}, status_code=int(exc.error_code))

        return answer

    def checked(request: Request) -> int | None:
        return model.check(request.path_params["name"], request.path_params.get("version", ""))

    async def health(request: Request) -> Response:
        if request.url.path.endswith("/live"):
            return JSONResponse({"live": True})
        # The protocol: 200 means ready, 4xx not ready.
        if await model.ready():
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": RunnerUnavailable().message}, status_code=400)

    async def server(_: Request) -> Response:
        return JSONResponse(server_metadata)

    async def metadata(request: Request) -> Response:
        return JSONResponse(await model.metadata(checked(request)))

    async def model_ready(request: Request) -> Response:
        if (reason := await model.unready(checked(request))) is None:
            return JSONResponse({"name": model.name, "ready": True})
        return JSONResponse({"name": model.name, "ready": False, "error": reason}, status_code=400)

    async def infer(request: Request) -> Response:
        version = checked(request)
        async with model.versioned(version):
            body, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
            requested = rest_outputs(body)
            outputs, answered, parameters = await model.infer(rest_images(body, binary), requested, version)
        return rest_response(model, answered, parameters, body, outputs, {o.name for o in requested if o.binary})

    model_paths = ("/models/{name}", "/models/{name}/versions/{version}")
    routes = [
        Route("/", answers(server), methods=["GET"]),
        Route("/health/live", answers(health), methods=["GET"]),
        Route("/health/ready", answers(health), methods=["GET"]),
        *(Route(path, answers(metadata), methods=["GET"]) for path in model_paths),
        *(Route(f"{path}/ready", answers(model_ready), methods=["GET"]) for path in model_paths),
        *(Route(f"{path}/infer", answers(infer), methods=["POST"]) for path in model_paths),
    ]
    return Starlette(routes=routes)


class ServerMetadataAtPrefix:
    """``GET /v2`` is server metadata; a mounted app only sees ``/v2/...`` (Starlette redirects ``/v2``)."""

    def __init__(self, app: t.Callable[..., t.Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, t.Any], receive: t.Any, send: t.Any) -> None:
        if scope["type"] == "http" and scope.get("path") == REST_PREFIX:
            scope = {**scope, "path": REST_PREFIX + "/", "raw_path": (REST_PREFIX + "/").encode()}
        await self.app(scope, receive, send)


# --- gRPC ----------------------------------------------------------------------


def grpc_images(request: t.Any) -> list[bytes]:
    if len(request.inputs) != 1:
        raise BadInput(f"expected one input, '{INPUT_NAME}'; got {len(request.inputs)}")
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise BadInput("raw_input_contents must hold one entry per input")
        elements = split_bytes_elements(request.raw_input_contents[0])
    else:
        elements = list(tensor.contents.bytes_contents)
    check_input(tensor.name, tensor.datatype, list(tensor.shape), len(elements))
    return [image_from_tensor_element(element) for element in elements]


def grpc_outputs(request: t.Any) -> list[RequestedOutput]:
    requested = []
    for output in request.outputs:
        classification = output.parameters["classification"] if "classification" in output.parameters else None
        if classification is not None and classification.WhichOneof("parameter_choice") != "int64_param":
            raise BadInput('"classification" must be an int64 parameter')
        count = classification.int64_param if classification is not None else 0
        if count < 0:
            raise BadInput(f'"classification" must be a non-negative integer, got {count}')
        requested.append(RequestedOutput(output.name, count))
    return requested


def add_to_server(servicer: t.Any, server: grpc.aio.Server) -> None:
    """Only the protocol's methods; Triton's other RPCs answer UNIMPLEMENTED, as for any unknown method."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(pb, f"{name}Request").FromString,
            response_serializer=getattr(pb, f"{name}Response").SerializeToString,
        )
        for name in GRPC_METHODS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers),))


def grpc_servicer(model: ServedModel, server_metadata: dict[str, t.Any]) -> type:
    class InferenceService:
        async def ServerLive(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            return pb.ServerReadyResponse(ready=await model.ready())

        async def ModelReady(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            return pb.ModelReadyResponse(ready=await model.unready(model.check(request.name, request.version)) is None)

        async def ServerMetadata(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            return pb.ServerMetadataResponse(**server_metadata)

        async def ModelMetadata(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            return pb.ModelMetadataResponse(**await model.metadata(model.check(request.name, request.version)))

        async def ModelInfer(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            # Errors raised here reach the client through guards.GrpcGuard, with their status code.
            version = model.check(request.model_name, request.model_version)
            async with model.versioned(version):
                outputs, answered, parameters = await model.infer(grpc_images(request), grpc_outputs(request), version)
            return pb.ModelInferResponse(
                model_name=model.name,
                model_version=answered,
                id=request.id,
                parameters={key: pb.InferParameter(string_param=value) for key, value in parameters.items()},
                outputs=[{"name": o.name, "datatype": o.datatype, "shape": o.shape} for o in outputs],
                raw_output_contents=[o.raw() for o in outputs],
            )

    return InferenceService


# The routes' JSON shapes, for the OpenAPI document (``openapi.declare``).
TENSOR_METADATA_SCHEMA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
INFER_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string", "example": INPUT_NAME},
                    "shape": {"type": "array", "items": {"type": "integer"}, "example": [1]},
                    "datatype": {"type": "string", "example": "BYTES"},
                    "parameters": {"type": "object"},
                    "data": {"type": "array", "description": 'base64 image files, or {"b64": ...} objects'},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
INFER_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": TENSOR_METADATA_SCHEMA},
    },
}
MODEL_METADATA_SCHEMA = {
    "type": "object",
    "required": ["name", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": TENSOR_METADATA_SCHEMA},
        "outputs": {"type": "array", "items": TENSOR_METADATA_SCHEMA},
    },
}


def openapi_protocol() -> openapi.Protocol:
    """The REST routes, with and without ``/versions/N``, for the OpenAPI document (JSON bodies only)."""
    probe = (400,)  # not ready: 4xx, as the protocol says
    routes = [
        openapi.Route("get", REST_PREFIX, "server metadata", {"type": "object", "required": ["name", "extensions"]}),
        openapi.Route(
            "get", f"{REST_PREFIX}/health/live", "live", {"type": "object", "required": ["live"]}, errors=probe
        ),
        openapi.Route(
            "get", f"{REST_PREFIX}/health/ready", "ready", {"type": "object", "required": ["ready"]}, errors=probe
        ),
    ]
    for model in (
        f"{REST_PREFIX}/models/{{model_name}}",
        f"{REST_PREFIX}/models/{{model_name}}/versions/{{model_version}}",
    ):
        routes += [
            openapi.Route("get", model, "model metadata", MODEL_METADATA_SCHEMA, errors=(404, 503, 504)),
            openapi.Route(
                "get",
                f"{model}/ready",
                "model ready",
                {"type": "object", "required": ["name", "ready"]},
                errors=(400, 404, 503, 504),
            ),
            openapi.Route("post", f"{model}/infer", "inference", INFER_RESPONSE_SCHEMA, INFER_REQUEST_SCHEMA),
        ]
    return openapi.Protocol(
        name="Open Inference Protocol (KServe v2)",
        description="the Open Inference Protocol at `/v2` (Triton's and KServe's clients); "
        "binary tensor data works too, beside the JSON documented here",
        routes=tuple(routes),
        path_parameters={
            "model_name": {"description": "the served model: inception_v3", "schema": {"type": "string"}},
            "model_version": {"description": "the model's version", "schema": {"type": "string"}},
        },
    )


def install(svc: bentoml.legacy.Service, classifier: Classifier) -> None:
    async def runners_ready() -> bool:
        return all(await asyncio.gather(*(runner.runner_handle_is_ready() for runner in svc.runners)))

    model = ServedModel(svc.name, classifier, runners_ready)
    server_metadata = {"name": "bentoml", "version": bentoml.__version__, "extensions": EXTENSIONS}
    svc.mount_asgi_app(rest_app(model, server_metadata), path=REST_PREFIX)
    svc.add_asgi_middleware(ServerMetadataAtPrefix)
    svc.mount_grpc_servicer(grpc_servicer(model, server_metadata), add_to_server, [GRPC_SERVICE])
    openapi.declare(openapi_protocol())


DOOR = Door(
    name="Open Inference Protocol (KServe v2)",
    rest_prefix=REST_PREFIX,
    metrics_endpoint=REST_PREFIX,
    health_paths=frozenset({f"{REST_PREFIX}/health/live", f"{REST_PREFIX}/health/ready"}),
    health_methods=frozenset({f"/{GRPC_SERVICE}/ServerLive", f"/{GRPC_SERVICE}/ServerReady"}),
    grpc_services=(GRPC_SERVICE,),
    install=install,
)
