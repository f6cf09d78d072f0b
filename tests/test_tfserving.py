"""TensorFlow Serving clients, unchanged, against the real servers: plain
``requests`` on the REST routes and ``tensorflow-serving-api`` stubs over gRPC,
written the way the reference client talks to TF Serving."""

from __future__ import annotations

import base64
import concurrent.futures

import bentoml
import grpc
import pytest
import requests
import tensorflow as tf
from google.protobuf import json_format, struct_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.images import unsupported_samples
from tests.test_servers import batch_size_histogram

pytestmark = pytest.mark.servers
MODEL = "inception_v3"


@pytest.fixture(scope="module")
def serving_version(saved_model: str) -> int:
    return bentoml.models.get(saved_model).info.metadata["serving_version"]


@pytest.fixture(scope="module")
def expected_label(cat_jpeg, reference_classify) -> str:
    return reference_classify(cat_jpeg)["label"]


@pytest.fixture(scope="module")
def rest(http_address) -> str:
    return f"http://{http_address}/v1/models/{MODEL}"


@pytest.fixture(scope="module")
def channel(grpc_address):
    with grpc.insecure_channel(grpc_address) as channel:
        yield channel


def predict_request(images: list[bytes], name: str = MODEL, signature: str = "serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(images))
    return request


# --- REST ----------------------------------------------------------------------


def test_rest_predict_columnar_as_the_reference_client(rest, cat_jpeg, expected_label):
    body = {"inputs": {"image": [base64.urlsafe_b64encode(cat_jpeg).decode("ascii")]}}
    response = requests.post(f"{rest}:predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == {"outputs": [expected_label]}


def test_rest_predict_row_format_and_b64_objects(rest, cat_jpeg, expected_label):
    standard = base64.b64encode(cat_jpeg).decode()
    urlsafe = base64.urlsafe_b64encode(cat_jpeg).decode()
    wrapped = base64.encodebytes(cat_jpeg).decode()  # 76 columns: TF Serving's decoder skips whitespace
    instances = [standard, {"b64": standard}, {"image": urlsafe}, {"b64": wrapped}]
    body = {"signature_name": "serving_default", "instances": instances}
    response = requests.post(f"{rest}:predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [expected_label] * 4}


def test_rest_predict_on_explicit_version(rest, serving_version, cat_jpeg, expected_label):
    body = {"inputs": [base64.urlsafe_b64encode(cat_jpeg).decode()]}
    response = requests.post(f"{rest}/versions/{serving_version}:predict", json=body, timeout=30)
    assert response.json() == {"outputs": [expected_label]}


def test_rest_model_status(rest, serving_version):
    response = requests.get(rest, timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "model_version_status": [
            {"version": str(serving_version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }


@pytest.mark.parametrize("path", ["/metadata", "/versions/{version}/metadata"])
def test_rest_metadata(rest, serving_version, path):
    response = requests.get(rest + path.format(version=serving_version), timeout=10)
    assert response.status_code == 200
    metadata = response.json()
    assert metadata["model_spec"] == {"name": MODEL, "signature_name": "", "version": str(serving_version)}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["image"]["dtype"] == "DT_STRING"
    assert signature["outputs"]["output_0"]["dtype"] == "DT_STRING"
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert metadata["metadata"]["engine"] == expected_engine()


@pytest.mark.parametrize("path", ["", "/metadata"])
def test_rest_head_answers_as_get_without_a_body(rest, path):
    """The route's OPTIONS says GET, POST and HEAD; HEAD was 404 "no such TensorFlow Serving route"."""
    got = requests.get(rest + path, timeout=10)
    head = requests.head(rest + path, timeout=10)
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers["content-length"] == got.headers["content-length"]


def expected_engine() -> dict:
    """What the runner loads here with the test configuration (engine and precision auto)."""
    import bentoml

    from inception_v3 import engines

    choice = engines.choose_here("auto", "auto", bentoml.models.get("inception_v3:latest"))
    return {"engine": "openvino", "precision": choice.precision, "device": "CPU", "cpu_flags": list(choice.cpu_flags)}


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("get", "http://{address}/v1/models/resnet", None),
        ("get", "http://{address}/v1/models/inception_v3/versions/999/metadata", None),
        ("post", "http://{address}/v1/models/resnet:predict", {"inputs": ["aGk="]}),
        ("post", "http://{address}/v1/models/inception_v3/versions/999:predict", {"inputs": ["aGk="]}),
    ],
)
def test_rest_unknown_model_or_version_is_404(http_address, method, url, body):
    response = requests.request(method, url.format(address=http_address), json=body, timeout=10)
    assert response.status_code == 404
    assert "not found" in response.json()["error"].lower()


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": {"image": ["%%% not base64 %%%"]}},
        {"instances": [{"b64": "%%%"}]},
        {"inputs": {"image": []}},
        {"neither": 1},
        {"inputs": {"image": [12]}},
        {"signature_name": "other", "inputs": ["aGk="]},
    ],
)
def test_rest_bad_requests_are_400_with_message(rest, body):
    response = requests.post(f"{rest}:predict", json=body, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


@pytest.mark.parametrize("version", ["abc", "-1", "1.5", "9" * 30])
def test_rest_a_version_that_is_no_number_is_400_as_in_tf_serving(rest, version):
    response = requests.get(f"{rest}/versions/{version}/metadata", timeout=10)
    assert response.status_code == 400
    assert response.json() == {"error": f"Malformed request: GET /v1/models/inception_v3/versions/{version}/metadata"}


def test_rest_invalid_json_is_400(rest):
    response = requests.post(f"{rest}:predict", data=b"{not json", timeout=10)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


# --- gRPC ----------------------------------------------------------------------


def test_grpc_predict_as_the_reference_client(channel, cat_jpeg, expected_label):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    # The reference client's own timeout: 5 s, so the server must be warm when ready.
    response = stub.Predict(predict_request([base64.urlsafe_b64encode(cat_jpeg)]), 5)
    assert response.outputs["output_0"].string_val[0].decode("utf-8") == expected_label


def test_grpc_predict_several_images_and_raw_bytes(channel, cat_jpeg, expected_label, serving_version):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(predict_request([base64.urlsafe_b64encode(cat_jpeg), cat_jpeg]), 30)
    assert [v.decode() for v in response.outputs["output_0"].string_val] == [expected_label] * 2
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == serving_version


def test_grpc_model_metadata(channel, serving_version):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = MODEL
    request.metadata_field.append("signature_def")
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, 10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.inputs["image"].dtype == tf.string.as_datatype_enum
    assert signature.outputs["output_0"].dtype == tf.string.as_datatype_enum
    assert response.model_spec.version.value == serving_version
    engine = struct_pb2.Struct()
    response.metadata["engine"].Unpack(engine)
    assert json_format.MessageToDict(engine) == expected_engine()


def test_grpc_model_status(channel, serving_version):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, 10)
    (status,) = response.model_version_status
    assert status.version == serving_version
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_grpc_unknown_model_or_version_is_not_found(channel, cat_jpeg):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    for request in (predict_request([cat_jpeg], name="resnet"), predict_request([cat_jpeg])):
        if request.model_spec.name == MODEL:
            request.model_spec.version.value = 999
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, 10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "method",
    [
        "/tensorflow.serving.PredictionService/Classify",
        "/tensorflow.serving.PredictionService/Regress",
        "/tensorflow.serving.PredictionService/MultiInference",
        "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
    ],
)
def test_grpc_methods_not_served_are_unimplemented(channel, method):
    """Not the generated stubs' NotImplementedError, which BentoML answers INTERNAL."""
    with pytest.raises(grpc.RpcError) as error:
        channel.unary_unary(method)(b"", timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "is not served" in error.value.details()


def test_grpc_malformed_tensors_are_invalid_argument(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    floats = predict_request([b"x"])
    floats.inputs["image"].CopyFrom(tf.make_tensor_proto([1.0, 2.0]))
    wrong_name = predict_request([b"x"])
    wrong_name.inputs["pixels"].CopyFrom(wrong_name.inputs.pop("image"))
    for request in (
        floats,
        wrong_name,
        predict_request([b"%%% not base64 %%%"]),
        predict_request([b"aGVsbG8="]),  # valid base64 of "hello": not an image
        predict_request([]),
        predict_request([b"x"], signature="other"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, 10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (unsupported_samples()["tiff"], "not a JPEG, PNG, WebP, BMP or GIF image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "an image must be base64 text or a JPEG, PNG, WebP, BMP or GIF"),
    ],
    ids=["tiff", "svg"],
)
def test_grpc_an_image_in_a_format_not_served_is_named_as_such(channel, image: bytes, message: str):
    """A TIFF's bytes, as /predict would judge them (415 there), not as broken base64; a text file
    (all ASCII, so it might have been base64) named as neither."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request([image]), 10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_tf_serving_and_bentoml_requests_share_runner_batches(http_address, rest, cat_jpeg):
    metrics_url = f"http://{http_address}/metrics"
    before = batch_size_histogram(requests.get(metrics_url, timeout=10).text)
    body = {"inputs": {"image": [base64.urlsafe_b64encode(cat_jpeg).decode()]}}

    def tf_serving(_: int) -> int:
        return requests.post(f"{rest}:predict", json=body, timeout=60).status_code

    def bentoml_api(_: int) -> int:
        url = f"http://{http_address}/predict"
        return requests.post(url, data=cat_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(call, i) for i in range(16) for call in (tf_serving, bentoml_api)]
        assert {f.result() for f in futures} == {200}
    after = batch_size_histogram(requests.get(metrics_url, timeout=10).text)
    images, batches = after["images"] - before["images"], after["count"] - before["count"]
    assert images == 32
    assert batches < images
