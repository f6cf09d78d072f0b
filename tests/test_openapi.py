"""Schemathesis against the running HTTP server's own OpenAPI document: for data
the schema allows and data it does not, no answer is a 5xx, every status is one
the document lists, and every body matches its documented schema. The Open
Inference Protocol's routes (``/v2``) are run the same way from a document of the
protocol's JSON shapes written here.

Schemathesis' pytest plugin (``@schema.parametrize``) fails under pytest 9
(``'Function' object has no attribute '_nodeid'``), so each operation's
Hypothesis strategy is run here directly."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

pytestmark = pytest.mark.servers

OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/predict"),
    ("POST", "/predict_batch"),
    *(
        (method, prefix + suffix)
        for prefix in ("/v1/models/{model_name}", "/v1/models/{model_name}/versions/{version}")
        for method, suffix in (("POST", ":predict"), ("GET", "/metadata"), ("GET", ""))
    ),
]


ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
PARAMETERS = {"type": "object"}
INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": PARAMETERS,
        "inputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string", "example": "image"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string", "example": "BYTES"},
                    "parameters": PARAMETERS,
                    "data": {"type": "array"},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": PARAMETERS},
            },
        },
    },
}
INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": TENSOR_METADATA},
    },
}
MODEL_METADATA = {
    "type": "object",
    "required": ["name", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": TENSOR_METADATA},
        "outputs": {"type": "array", "items": TENSOR_METADATA},
    },
}


def answers(ok_schema: dict, *statuses: int) -> dict:
    json_body = {"content": {"application/json": {"schema": ok_schema}}}
    errors = {str(s): {"description": "error", "content": {"application/json": {"schema": ERROR}}} for s in statuses}
    return {"200": {"description": "OK", **json_body}, **errors}


def open_inference_document() -> dict:
    name = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict = {
        "/v2": {"get": {"responses": answers({"type": "object", "required": ["name", "extensions"]})}},
        "/v2/health/live": {"get": {"responses": answers({"type": "object", "required": ["live"]})}},
        "/v2/health/ready": {"get": {"responses": answers({"type": "object", "required": ["ready"]})}},
    }
    for model in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        parameters = [name, version] if "versions" in model else [name]
        ready = {"type": "object", "required": ["name", "ready"]}
        paths[model] = {"get": {"parameters": parameters, "responses": answers(MODEL_METADATA, 404)}}
        paths[f"{model}/ready"] = {"get": {"parameters": parameters, "responses": answers(ready, 404)}}
        paths[f"{model}/infer"] = {
            "post": {
                "parameters": parameters,
                "requestBody": {"required": True, "content": {"application/json": {"schema": INFER_REQUEST}}},
                "responses": answers(INFER_RESPONSE, 400, 404, 413, 503),
            }
        }
    return {"openapi": "3.0.3", "info": {"title": "Open Inference Protocol", "version": "2"}, "paths": paths}


@pytest.fixture(scope="module")
def served_schema(http_address: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"http://{http_address}/docs.json")


@pytest.fixture(scope="module")
def open_inference_schema(http_address: str) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_dict(open_inference_document())
    schema.config.update(base_url=f"http://{http_address}")
    return schema


def test_document_lists_the_services_operations(served_schema: schemathesis.BaseSchema) -> None:
    listed = {(result.ok().method.upper(), result.ok().path) for result in served_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    # Only what takes a body can break the schema.
    (method, path, GenerationMode.NEGATIVE)
    for method, path in OPERATIONS
    if method == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_conforms_to_the_document(
    served_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = served_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def conforms(case: schemathesis.Case) -> None:
        # /predict documents its body as any bytes of an image type; random bytes are
        # not an image and are rightly refused with 415, so that check does not apply.
        case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=120)

    conforms()


OPEN_INFERENCE_CASES = [
    (method.upper(), path, mode)
    for path, item in open_inference_document()["paths"].items()
    for method in item
    for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if method == "post" else [GenerationMode.POSITIVE])
]


@pytest.mark.parametrize(("method", "path", "mode"), OPEN_INFERENCE_CASES)
def test_open_inference_operation_conforms(
    open_inference_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = open_inference_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def conforms(case: schemathesis.Case) -> None:
        # Random strings are not images: a schema-valid request is rightly refused with 400.
        case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=120)

    conforms()
