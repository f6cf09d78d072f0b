"""The OpenAPI document the Swagger UI shows, from the service's ASGI app in-process
(no runner: the document needs none)."""

from __future__ import annotations

import typing as t
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from inception_v3 import openapi

TF_SERVING_PATHS = {
    ("post", "/v1/models/{model_name}:predict"),
    ("get", "/v1/models/{model_name}/metadata"),
    ("get", "/v1/models/{model_name}"),
    ("post", "/v1/models/{model_name}/versions/{version}:predict"),
    ("get", "/v1/models/{model_name}/versions/{version}/metadata"),
    ("get", "/v1/models/{model_name}/versions/{version}"),
}


@pytest.fixture(scope="module")
def docs(saved_model: str) -> Iterator[TestClient]:
    import service

    yield TestClient(service.svc.asgi_app)


def document(docs: TestClient) -> dict[str, t.Any]:
    response = docs.get("/docs.json")
    assert response.status_code == 200
    return response.json()


def test_the_service_is_described(docs: TestClient, saved_model: str) -> None:
    info = document(docs)["info"]
    assert info["title"] == "inception_v3"  # bentoml.client.Client.from_url names its Service after it
    assert info["version"] != "None" and saved_model in info["version"]
    assert "Inception v3" in info["description"] and "TensorFlow Serving REST" in info["description"]
    assert "inception_v3:dev" not in info["description"] and "![" not in info["description"]  # badges


def test_upload_offers_jpeg_first(docs: TestClient) -> None:
    """Swagger UI preselects the first type; it was a random one of the five."""
    content = document(docs)["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert next(iter(content)) == "image/jpeg"
    assert set(content) == {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif"}


def test_tf_serving_routes_are_documented(docs: TestClient) -> None:
    paths = document(docs)["paths"]
    documented = {(method, path) for path, item in paths.items() for method in item if path.startswith("/v1/")}
    assert documented == TF_SERVING_PATHS
    predict = paths["/v1/models/{model_name}:predict"]["post"]
    assert predict["tags"] == ["TensorFlow Serving REST"]
    assert "inputs" in predict["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"400", "404"} <= set(predict["responses"])


def test_error_schemas_list_only_the_error_field(docs: TestClient) -> None:
    schemas = document(docs)["components"]["schemas"]
    errors = {name: schema for name, schema in schemas.items() if "error" in schema.get("properties", {})}
    assert {"Error", "InvalidArgument", "NotFound", "InternalServerError"} <= set(errors)
    assert all(set(schema["properties"]) == {"error"} for schema in errors.values()), errors


def test_another_protocol_is_documented_by_declaring_it(docs: TestClient) -> None:
    route = openapi.Route("get", "/v2/models/{model_name}/ready", "readiness", {"type": "object"}, errors=(404,))
    openapi.declare(openapi.Protocol("Another protocol", "a door declared in a test", (route,)))
    try:
        spec = document(docs)
    finally:
        del openapi.PROTOCOLS["Another protocol"]
    operation = spec["paths"]["/v2/models/{model_name}/ready"]["get"]
    assert operation["tags"] == ["Another protocol"]
    assert operation["parameters"][0]["name"] == "model_name" and set(operation["responses"]) == {"200", "404"}
    assert {"name": "Another protocol", "description": "a door declared in a test"} in spec["tags"]
