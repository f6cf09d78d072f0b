"""TensorFlow Serving's doors on the same servers and the same runner.

REST (mounted at ``/v1`` on the HTTP server) and gRPC (``PredictionService`` and
``ModelService`` on the gRPC server) speak the reference model's contract: input
``image``, a DT_STRING batch of URL-safe base64 image files; output ``output_0``,
the top-1 labels. Existing TF Serving clients work unchanged. Requests go through
the service's runner, so they share its batches with BentoML's own APIs.
Every version the runner serves answers by number (``/versions/N``,
``model_spec.version``); a request naming none gets the newest, and the answer
names the one that answered (``model_spec.version``, REST: ``X-Model-Version``).
``GetModelStatus`` lists every version with its state and error.
The metadata answer also names the model's ``weights`` (``imagenet``, ``file`` or
``random``); for random weights, predictions carry a warning beside TF Serving's
body: the ``X-Model-Warning`` header (REST) or trailing metadata key (gRPC).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import typing as t
from pathlib import Path

from bentoml.exceptions import BadInput, BentoMLException
from google.protobuf import json_format, struct_pb2, wrappers_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import openapi, versions, weights
from ..api import image_from_tensor_element, json_value_to_image
from ..errors import ModelNotFound
from ..labels import top_k
from ..observability import add_trailing_metadata
from . import Door, VersionedModel

if t.TYPE_CHECKING:
    import bentoml

    from ..classifier import Classified, Classifier


TF_SERVING_MODULES = (
    "tensorflow.core.framework.types_pb2",
    "tensorflow.core.protobuf.meta_graph_pb2",
    "tensorflow_serving.apis.get_model_metadata_pb2",
    "tensorflow_serving.apis.get_model_status_pb2",
    "tensorflow_serving.apis.model_service_pb2_grpc",
    "tensorflow_serving.apis.predict_pb2",
    "tensorflow_serving.apis.prediction_service_pb2_grpc",
)


# Copies of those modules and the ones they import, for hosts without TensorFlow (the CPU
# image): container/tf_serving_protos.py makes them from the installed packages.
VENDORED_PROTOS = Path(__file__).with_name("tf_serving_protos")


def import_tf_serving_apis() -> types.SimpleNamespace:
    """Import TF Serving's protobuf modules without starting TensorFlow itself.

    They import ``tensorflow.core.*_pb2``, and importing anything under
    ``tensorflow`` runs its ``__init__``: 5 s and 550 MB per API server. A bare
    package object stands in while the (pure protobuf) modules load, then goes
    away, so a later ``import tensorflow`` works as usual and reuses them.
    Where ``tensorflow-serving-api`` is not installed, ``VENDORED_PROTOS`` is.
    """
    if importlib.util.find_spec("tensorflow_serving") is None:
        sys.path.append(str(VENDORED_PROTOS))
    stand_in = None
    if "tensorflow" not in sys.modules:
        location = importlib.util.find_spec("tensorflow").submodule_search_locations
        stand_in = sys.modules["tensorflow"] = types.ModuleType("tensorflow")
        stand_in.__path__ = list(location)
    try:
        return types.SimpleNamespace(
            **{name.rpartition(".")[2]: importlib.import_module(name) for name in TF_SERVING_MODULES}
        )
    finally:
        if stand_in is not None and sys.modules.get("tensorflow") is stand_in:
            del sys.modules["tensorflow"]


pb = import_tf_serving_apis()
SIGNATURE_NAME = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAME = "output_0"
REST_PREFIX = "/v1"
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
WARNING_KEY = "x-model-warning"  # gRPC metadata keys are lower case
VERSION_KEY = "x-model-version"  # REST predict answers: the version that answered (gRPC: model_spec)
READ_METHODS = ("GET", "HEAD")  # the route answers HEAD as GET, as it says it does (uvicorn sends no body)


# TF Serving's status codes in GetModelStatus (tensorflow.error.Code): a version that failed is UNKNOWN.
STATUS_OK, STATUS_UNKNOWN = 0, 2


class ServedModel(VersionedModel):
    """The model as TF Serving clients see it: a name, its versions, one signature."""

    def check(self, name: str, signature: str = "") -> None:
        if name != self.name:
            raise ModelNotFound(f"Servable not found for request: Latest({name})")
        if signature not in ("", SIGNATURE_NAME):
            raise BadInput(f'Serving signature name: "{signature}" not found in signature def')

    def not_found(self, version: int | None) -> ModelNotFound:
        spec = f"Specific({self.name}, {version})" if version is not None else f"Latest({self.name})"
        return ModelNotFound(f"Servable not found for request: {spec}")

    async def predict_labels(self, images: list[bytes], version: int | None) -> tuple[list[str], Classified]:
        if not images:
            raise BadInput(f"input '{INPUT_NAME}' is empty: send at least one image")
        classified = await self.classifier.classify_tensor_elements(images, version)
        return [top_k(row, self.classifier.class_names, 1)[0][0] for row in classified.probabilities], classified

    def signature_def_map(self) -> t.Any:
        def tensor_info(name: str) -> t.Any:
            return pb.meta_graph_pb2.TensorInfo(
                name=name,
                dtype=pb.types_pb2.DT_STRING,
                tensor_shape={"dim": [{"size": -1}]},
            )

        signature = pb.meta_graph_pb2.SignatureDef(
            inputs={INPUT_NAME: tensor_info(f"{SIGNATURE_NAME}_{INPUT_NAME}:0")},
            outputs={OUTPUT_NAME: tensor_info("StatefulPartitionedCall:0")},
            method_name="tensorflow/serving/predict",
        )
        return pb.get_model_metadata_pb2.SignatureDefMap(signature_def={SIGNATURE_NAME: signature})

    async def status(self, version: int | None) -> t.Any:
        """Every version the runner knows (or ``version`` alone), with TF Serving's states."""
        statuses = await self.classifier.model_status()
        if version is not None:
            statuses = [s for s in statuses if s["version"] == version]
            if not statuses:
                raise self.not_found(version)
        return pb.get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[
                {
                    "version": s["version"],
                    "state": s["state"],
                    "status": {"error_code": STATUS_UNKNOWN, "error_message": s["error"]}
                    if s["error"]
                    else {"error_code": STATUS_OK},
                }
                for s in statuses
            ]
        )


def rest_images(body: t.Any) -> tuple[list[bytes], str]:
    """Images from a TF Serving REST body, and the output key its format answers with."""
    if not isinstance(body, dict):
        raise BadInput('body must be a JSON object with "inputs" or "instances"')
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list):
            raise BadInput('"instances" must be a list')
        values = [row[INPUT_NAME] if isinstance(row, dict) and INPUT_NAME in row else row for row in rows]
        return [json_value_to_image(v, INPUT_NAME) for v in values], "predictions"
    if "inputs" in body:
        inputs = body["inputs"]
        values = inputs.get(INPUT_NAME) if isinstance(inputs, dict) and "b64" not in inputs else inputs
        if not isinstance(values, list):
            values = [values]
        return [json_value_to_image(v, INPUT_NAME) for v in values], "outputs"
    raise BadInput('body must be a JSON object with "inputs" or "instances"')


def rest_app(model: ServedModel) -> Starlette:
    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def parse_path(request: Request) -> tuple[str, int | None, str]:
        """``models/NAME[/versions/N][:verb]`` from the path; TF Serving puts ':predict' in the segment."""
        rest = request.path_params["rest"]
        path, _, verb = rest.partition(":")
        parts = path.strip("/").split("/")
        version = None
        if len(parts) >= 3 and parts[1] == "versions":
            if (version := versions.parse_number(parts[2])) is None:
                raise BadInput(f"Malformed request: {request.method} {request.url.path}")  # TF Serving's 400
            parts = [parts[0], *parts[3:]]
        model.check(parts[0])
        tail = "/".join(parts[1:])
        return tail, version, verb

    async def models(request: Request) -> JSONResponse:
        try:
            tail, version, verb = parse_path(request)
            if request.method in READ_METHODS and not verb and tail == "":
                return JSONResponse(proto_to_json(await model.status(version)))
            if request.method in READ_METHODS and not verb and tail == "metadata":
                return JSONResponse(metadata_json(model, await model.available(version)))
            if request.method == "POST" and verb == "predict" and tail == "":
                async with model.versioned(version):
                    try:
                        body = json.loads(await request.body())
                    except (ValueError, RecursionError) as parse_error:  # RecursionError: nested too deep
                        raise BadInput(f"body is not valid JSON: {parse_error}") from None
                    images, output_key = rest_images(body)
                    if body.get("signature_name"):
                        model.check(model.name, body["signature_name"])
                    labels, classified = await model.predict_labels(images, version)
                headers = {VERSION_KEY: str(classified.version)}
                if classified.warning:
                    headers[WARNING_KEY] = classified.warning
                return JSONResponse({output_key: labels}, headers=headers)
            return error(
                404, f"no such TensorFlow Serving route: {request.method} /v1/models/{request.path_params['rest']}"
            )
        except BentoMLException as exc:
            return error(int(exc.error_code), exc.message)

    return Starlette(routes=[Route("/models/{rest:path}", models, methods=["GET", "POST"])])


def proto_to_json(message: t.Any) -> dict[str, t.Any]:
    """TF Serving's REST JSON: field names as in the proto, defaults such as "OK" included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def metadata_json(model: ServedModel, status: dict[str, t.Any]) -> dict[str, t.Any]:
    """``status``: the version's, from ``Classifier.available``."""
    signature_defs = proto_to_json(model.signature_def_map())
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": str(status["version"])},
        "metadata": {
            "signature_def": signature_defs,
            "weights": weights.kind(status["metadata"]),
            "engine": status["engine"],
        },
    }


def grpc_servicers(model: ServedModel) -> list[tuple[type, t.Callable[..., None], list[str]]]:
    import grpc

    async def abort_with(context: grpc.aio.ServicerContext, exc: BentoMLException) -> None:
        from bentoml.grpc.utils import grpc_status_code

        await context.abort(grpc_status_code(exc), exc.message)

    def spec_version(spec: t.Any) -> int | None:
        return spec.version.value if spec.HasField("version") else None

    def not_served(service: str, method: str, served: str) -> t.Callable[..., t.Awaitable[None]]:
        """For the generated servicer's stubs, which raise NotImplementedError: BentoML answers it INTERNAL."""

        async def refuse(self: t.Any, request: t.Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{service}/{method} is not served (only {served})")

        return refuse

    class PredictionService(pb.prediction_service_pb2_grpc.PredictionServiceServicer):
        Classify = not_served(PREDICTION_SERVICE, "Classify", "Predict and GetModelMetadata")
        Regress = not_served(PREDICTION_SERVICE, "Regress", "Predict and GetModelMetadata")
        MultiInference = not_served(PREDICTION_SERVICE, "MultiInference", "Predict and GetModelMetadata")

        async def Predict(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            try:
                model.check(request.model_spec.name, request.model_spec.signature_name)
                version = spec_version(request.model_spec)
                async with model.versioned(version):
                    if set(request.inputs) != {INPUT_NAME}:
                        raise BadInput(f"expected exactly one input named '{INPUT_NAME}', got {sorted(request.inputs)}")
                    tensor = request.inputs[INPUT_NAME]
                    if tensor.dtype != pb.types_pb2.DT_STRING:
                        raise BadInput(f"input '{INPUT_NAME}' must be DT_STRING")
                    labels, classified = await model.predict_labels(
                        [image_from_tensor_element(v) for v in tensor.string_val], version
                    )
            except BentoMLException as exc:
                await abort_with(context, exc)
            response = pb.predict_pb2.PredictResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = classified.version
            response.model_spec.signature_name = SIGNATURE_NAME
            output = response.outputs[OUTPUT_NAME]
            output.dtype = pb.types_pb2.DT_STRING
            output.tensor_shape.dim.add(size=len(labels))
            output.string_val.extend(label.encode() for label in labels)
            if classified.warning:
                add_trailing_metadata(context, (WARNING_KEY, classified.warning))
            return response

        async def GetModelMetadata(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            try:
                model.check(request.model_spec.name)
                if list(request.metadata_field) != ["signature_def"]:
                    raise BadInput("metadata_field must be ['signature_def']")
                status = await model.available(spec_version(request.model_spec))
            except BentoMLException as exc:
                await abort_with(context, exc)
            response = pb.get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = status["version"]
            response.metadata["signature_def"].Pack(model.signature_def_map())
            response.metadata["weights"].Pack(wrappers_pb2.StringValue(value=weights.kind(status["metadata"])))
            response.metadata["engine"].Pack(json_format.ParseDict(status["engine"], struct_pb2.Struct()))
            return response

    class ModelService(pb.model_service_pb2_grpc.ModelServiceServicer):
        HandleReloadConfigRequest = not_served(MODEL_SERVICE, "HandleReloadConfigRequest", "GetModelStatus")

        async def GetModelStatus(self, request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:  # noqa: N802
            try:
                model.check(request.model_spec.name)
                return await model.status(spec_version(request.model_spec))
            except BentoMLException as exc:
                await abort_with(context, exc)

    return [
        (
            PredictionService,
            pb.prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
            [PREDICTION_SERVICE],
        ),
        (
            ModelService,
            pb.model_service_pb2_grpc.add_ModelServiceServicer_to_server,
            [MODEL_SERVICE],
        ),
    ]


def openapi_protocol() -> openapi.Protocol:
    """The REST door's routes, with and without ``/versions/N``, for the OpenAPI document."""
    images = {
        "description": 'base64 image files (URL-safe or standard alphabet), or {"b64": ...} objects',
        "type": "array",
        "items": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"b64": {"type": "string"}}}]},
    }
    predict_request = {
        "type": "object",
        "properties": {
            "inputs": {"type": "object", "properties": {INPUT_NAME: images}, "example": {INPUT_NAME: ["/9j/4AAQ..."]}},
            "instances": images,
            "signature_name": {"type": "string", "example": SIGNATURE_NAME},
        },
        "example": {"inputs": {INPUT_NAME: ["/9j/4AAQ..."]}},
    }
    labels = {"type": "array", "items": {"type": "string"}, "example": ["Siamese cat"]}
    predict_response = {
        "type": "object",
        "description": '"outputs" for a request with "inputs", "predictions" for one with "instances"',
        "properties": {"outputs": labels, "predictions": labels},
    }
    routes: list[openapi.Route] = []
    for prefix in ("/v1/models/{model_name}", "/v1/models/{model_name}/versions/{version}"):
        lookup_errors = (400, 404, 503, 504) if "{version}" in prefix else (404, 503, 504)  # 400: no version number
        routes += [
            openapi.Route("post", f"{prefix}:predict", "top-1 labels", predict_response, predict_request),
            openapi.Route(
                "get",
                f"{prefix}/metadata",
                "the model's signature",
                {"type": "object", "required": ["model_spec", "metadata"]},
                errors=lookup_errors,
            ),
            openapi.Route(
                "get",
                prefix,
                "the model's status",
                {"type": "object", "required": ["model_version_status"]},
                errors=lookup_errors,
            ),
        ]
    return openapi.Protocol(
        name="TensorFlow Serving REST",
        description="TensorFlow Serving's REST API at `/v1/models/inception_v3`, as its clients send it",
        routes=tuple(routes),
        path_parameters={
            "model_name": {"description": "the served model: inception_v3", "schema": {"type": "string"}},
            "version": {"description": "the model's version (save_model.py records it)", "schema": {"type": "integer"}},
        },
    )


def install(svc: bentoml.legacy.Service, classifier: Classifier) -> None:
    model = ServedModel(svc.name, classifier)
    svc.mount_asgi_app(rest_app(model), path=REST_PREFIX)
    openapi.declare(openapi_protocol())
    for servicer, add_to_server, names in grpc_servicers(model):
        svc.mount_grpc_servicer(servicer, add_to_server, names)


DOOR = Door(
    name="TensorFlow Serving",
    rest_prefix=REST_PREFIX,
    metrics_endpoint=f"{REST_PREFIX}/models",
    health_paths=frozenset(),
    health_methods=frozenset(),
    grpc_services=(PREDICTION_SERVICE, MODEL_SERVICE),
    install=install,
)
