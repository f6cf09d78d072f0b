"""The service in-process: BentoML's ASGI app with a local runner, no server
processes. Fast checks of the API surface the servers expose, and of the OpenAPI
document the Swagger UI shows.

One app for the module: after its lifespan ends, BentoML's app answers nothing."""

from __future__ import annotations

import base64
import typing as t

import pytest
from starlette.testclient import TestClient

from inception_v3 import openapi
from tests.conftest import ROOT
from tests.expectations import assert_same_prediction

TF_SERVING_PATHS = {
    ("post", "/v1/models/{model_name}:predict"),
    ("get", "/v1/models/{model_name}/metadata"),
    ("get", "/v1/models/{model_name}"),
    ("post", "/v1/models/{model_name}/versions/{version}:predict"),
    ("get", "/v1/models/{model_name}/versions/{version}/metadata"),
    ("get", "/v1/models/{model_name}/versions/{version}"),
}


@pytest.fixture(scope="module")
def app(saved_model: str):
    import service

    # The app's startup runs the runner in this process, as `bentoml serve --development` would.
    with TestClient(service.svc.asgi_app) as client:
        yield client


def test_predict_in_process(app, cat_jpeg, reference_classify):
    response = app.post("/predict", content=cat_jpeg, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert_same_prediction(response.json(), reference_classify(cat_jpeg))
    assert response.headers["x-request-id"]


def test_every_bentoml_app_of_the_service_frees_answered_requests(app):
    """Its HTTP API servers and its runner server build their timeout from this class (``tests/test_timeouts.py``)."""
    from bentoml._internal.server.http import traffic

    from inception_v3.guards import RequestTimeout

    assert traffic.TimeoutMiddleware is RequestTimeout


def test_predict_multipart_upload(app, cat_jpeg, reference_classify):
    response = app.post("/predict", files={"image": ("cat.jpg", cat_jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["label"] == reference_classify(cat_jpeg)["label"]


def test_predict_batch_in_process(app, cat_jpeg, reference_classify):
    """Standard, URL-safe without padding, and wrapped at 76 columns as ``base64`` writes it."""
    images = [
        base64.b64encode(cat_jpeg).decode(),
        base64.urlsafe_b64encode(cat_jpeg).decode().rstrip("="),
        base64.encodebytes(cat_jpeg).decode().replace("\n", "\r\n"),
    ]
    body = {"images": images, "top_k": 1}
    response = app.post("/predict_batch", json=body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == [reference_classify(cat_jpeg)["label"]] * 3
    assert all(len(p["top_k"]) == 1 for p in predictions)


def test_openapi_documents_both_apis(app):
    spec = app.get("/docs.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "image/jpeg" in predict["requestBody"]["content"]
    assert "/predict_batch" in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert {"label", "score", "top_k"} <= set(schemas["Prediction"]["properties"])


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"", "image/jpeg", 400),
        (b"definitely not an image", "image/jpeg", 415),
        ((ROOT / "cat.jpg").read_bytes()[:5000], "image/jpeg", 400),
        (b"{}", "application/json", 415),
    ],
)
def test_bad_input_is_4xx_json(app, body, content_type, status):
    response = app.post("/predict", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]


def document(app: TestClient) -> dict[str, t.Any]:
    response = app.get("/docs.json")
    assert response.status_code == 200
    return response.json()


def test_the_service_is_described(app: TestClient, saved_model: str) -> None:
    info = document(app)["info"]
    assert info["title"] == "inception_v3"  # bentoml.client.Client.from_url names its Service after it
    assert info["version"] != "None" and saved_model in info["version"]
    assert "Inception v3" in info["description"] and "TensorFlow Serving REST" in info["description"]
    assert "inception_v3:dev" not in info["description"] and "![" not in info["description"]  # badges


def test_upload_offers_jpeg_first(app: TestClient) -> None:
    """Swagger UI preselects the first type; it was a random one of the five."""
    content = document(app)["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert next(iter(content)) == "image/jpeg"
    assert set(content) == {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif"}


def test_tf_serving_routes_are_documented(app: TestClient) -> None:
    paths = document(app)["paths"]
    documented = {(method, path) for path, item in paths.items() for method in item if path.startswith("/v1/")}
    assert documented == TF_SERVING_PATHS
    predict = paths["/v1/models/{model_name}:predict"]["post"]
    assert predict["tags"] == ["TensorFlow Serving REST"]
    assert "inputs" in predict["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"400", "404"} <= set(predict["responses"])


def test_error_schemas_list_only_the_error_field(app: TestClient) -> None:
    schemas = document(app)["components"]["schemas"]
    errors = {name: schema for name, schema in schemas.items() if "error" in schema.get("properties", {})}
    assert {"Error", "InvalidArgument", "NotFound", "InternalServerError"} <= set(errors)
    assert all(set(schema["properties"]) == {"error"} for schema in errors.values()), errors


def test_another_protocol_is_documented_by_declaring_it(app: TestClient) -> None:
    route = openapi.Route("get", "/v2/models/{model_name}/ready", "readiness", {"type": "object"}, errors=(404,))
    openapi.declare(openapi.Protocol("Another protocol", "a door declared in a test", (route,)))
    try:
        spec = document(app)
    finally:
        del openapi.PROTOCOLS["Another protocol"]
    operation = spec["paths"]["/v2/models/{model_name}/ready"]["get"]
    assert operation["tags"] == ["Another protocol"]
    assert operation["parameters"][0]["name"] == "model_name" and set(operation["responses"]) == {"200", "404"}
    assert {"name": "Another protocol", "description": "a door declared in a test"} in spec["tags"]
