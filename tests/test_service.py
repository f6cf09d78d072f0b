"""The service in-process: BentoML's ASGI app with a local runner, no server
processes. Fast checks of the API surface the servers expose."""

from __future__ import annotations

import base64

import pytest
from starlette.testclient import TestClient

from tests.conftest import ROOT
from tests.expectations import assert_same_prediction


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


def test_predict_multipart_upload(app, cat_jpeg, reference_classify):
    response = app.post("/predict", files={"image": ("cat.jpg", cat_jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["label"] == reference_classify(cat_jpeg)["label"]


def test_predict_batch_in_process(app, cat_jpeg, reference_classify):
    body = {"images": [base64.b64encode(cat_jpeg).decode()] * 3, "top_k": 1}
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
