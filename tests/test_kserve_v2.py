"""Open Inference Protocol (KServe v2) clients, unchanged, against the real servers:
``tritonclient.http`` and ``tritonclient.grpc`` (2.66.0, on the project's protobuf 5
and grpcio), written the way a Triton user writes them, and plain ``requests`` JSON.
Every answer equals the in-process model's answer for the same bytes."""

from __future__ import annotations

import base64
import json
import struct

import bentoml
import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from inception_v3.weights import RANDOM_WARNING
from tests.expectations import assert_same_prediction

pytestmark = pytest.mark.servers
MODEL = "inception_v3"


@pytest.fixture(scope="module")
def serving_version(saved_model: str) -> str:
    return str(bentoml.models.get(saved_model).info.metadata["serving_version"])


@pytest.fixture(scope="module")
def class_names(saved_model: str) -> list[str]:
    return bentoml.models.get(saved_model).custom_objects["class_names"]


@pytest.fixture(scope="module")
def http_client(http_address):
    client = httpclient.InferenceServerClient(http_address, network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(grpc_address):
    client = grpcclient.InferenceServerClient(grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def infer_url(http_address) -> str:
    return f"http://{http_address}/v2/models/{MODEL}/infer"


def image_input(module, images: list[bytes], binary: bool = True):
    tensor = module.InferInput("image", [len(images)], "BYTES")
    if module is httpclient:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    else:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def prediction(probabilities: np.ndarray, class_names: list[str], k: int = 5) -> dict:
    best = np.argsort(-probabilities, kind="stable")[:k]
    top_k = [{"label": class_names[i], "score": float(probabilities[i])} for i in best]
    return {"label": top_k[0]["label"], "score": top_k[0]["score"], "top_k": top_k}


def classification_prediction(rows: np.ndarray, class_names: list[str]) -> dict:
    """Triton's "score:index:label" strings as a prediction; the index names the label."""
    top_k = []
    for row in rows:
        score, index, label = (row.decode() if isinstance(row, bytes) else row).split(":", 2)
        assert class_names[int(index)] == label
        top_k.append({"label": label, "score": float(score)})
    return {"label": top_k[0]["label"], "score": top_k[0]["score"], "top_k": top_k}


def assert_same_classes(served: dict, expected: dict) -> None:
    """Classification strings carry 6 decimals (C++'s std::to_string, as Triton prints them)."""
    assert [e["label"] for e in served["top_k"]] == [e["label"] for e in expected["top_k"]]
    assert [e["score"] for e in served["top_k"]] == pytest.approx([e["score"] for e in expected["top_k"]], abs=1e-6)


# --- tritonclient.http ---------------------------------------------------------


def test_http_health_and_metadata(http_client, serving_version):
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    assert http_client.is_model_ready(MODEL)
    assert http_client.is_model_ready(MODEL, serving_version)
    assert set(http_client.get_server_metadata()["extensions"]) >= {"binary_tensor_data", "classification"}
    metadata = http_client.get_model_metadata(MODEL)
    assert metadata["versions"] == [serving_version]
    assert metadata["platform"] in ("openvino_bf16", "openvino_fp32")  # engine and precision auto, on a CPU
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]},
    ]


def test_http_infer_binary_by_default(http_client, cat_jpeg, reference_classify, class_names):
    result = http_client.infer(MODEL, [image_input(httpclient, [cat_jpeg, cat_jpeg])])
    expected = reference_classify(cat_jpeg)
    assert [label.decode() for label in result.as_numpy("label")] == [expected["label"]] * 2
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 1000) and probabilities.dtype == np.float32
    for row in probabilities:
        assert_same_prediction(prediction(row, class_names), expected)


def test_http_infer_json_tensors_and_classification(http_client, cat_jpeg, reference_classify, class_names):
    encoded = base64.b64encode(cat_jpeg)
    outputs = [
        httpclient.InferRequestedOutput("label", binary_data=False),
        httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=3),
    ]
    result = http_client.infer(
        MODEL, [image_input(httpclient, [encoded], binary=False)], outputs=outputs, request_id="req-7"
    )
    assert result.get_response()["id"] == "req-7"
    expected = reference_classify(cat_jpeg, k=3)
    assert list(result.as_numpy("label")) == [expected["label"]]
    classes = result.as_numpy("probabilities")
    assert classes.shape == (1, 3)
    assert_same_classes(classification_prediction(classes[0], class_names), expected)


def test_http_bad_tensor_is_400(http_client):
    with pytest.raises(InferenceServerException) as raised:
        http_client.infer(MODEL, [image_input(httpclient, [b"hello, not an image"])])
    assert raised.value.status() == "400"


# --- tritonclient.grpc ---------------------------------------------------------


def test_grpc_health_and_metadata(grpc_client, serving_version):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(MODEL)
    assert grpc_client.is_model_ready(MODEL, serving_version)
    assert "classification" in grpc_client.get_server_metadata().extensions
    metadata = grpc_client.get_model_metadata(MODEL, as_json=True)
    assert metadata["versions"] == [serving_version]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("label", "BYTES", ["-1"]),
        ("probabilities", "FP32", ["-1", "1000"]),
    ]


def test_grpc_infer_raw_contents(grpc_client, cat_jpeg, reference_classify, class_names, serving_version):
    result = grpc_client.infer(MODEL, [image_input(grpcclient, [cat_jpeg])], request_id="g-1", client_timeout=30)
    expected = reference_classify(cat_jpeg)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, serving_version, "g-1")
    assert [label.decode() for label in result.as_numpy("label")] == [expected["label"]]
    assert_same_prediction(prediction(result.as_numpy("probabilities")[0], class_names), expected)


def test_grpc_classification(grpc_client, cat_jpeg, reference_classify, class_names):
    outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=5)]
    result = grpc_client.infer(MODEL, [image_input(grpcclient, [cat_jpeg])], outputs=outputs, client_timeout=30)
    assert result.as_numpy("label") is None
    assert_same_classes(
        classification_prediction(result.as_numpy("probabilities")[0], class_names), reference_classify(cat_jpeg)
    )


def grpc_request(elements: list[bytes], name: str = "image", datatype: str = "BYTES", shape=None, **fields):
    request = service_pb2.ModelInferRequest(model_name=MODEL, **fields)
    request.inputs.add(name=name, datatype=datatype, shape=[len(elements)] if shape is None else shape)
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in elements))
    return request


@pytest.mark.parametrize(
    "request_fields",
    [
        {"name": "pixels"},
        {"datatype": "FP32"},
        {"shape": [1, 1]},
        {"shape": [2]},
        {"elements": [b"hello"]},
        {"elements": []},
    ],
    ids=["name", "datatype", "rank", "count", "not-an-image", "empty"],
)
def test_grpc_bad_tensors_are_invalid_argument(grpc_address, cat_jpeg, request_fields):
    elements = request_fields.pop("elements", [cat_jpeg])
    request = grpc_request(elements, **request_fields)
    with grpc.insecure_channel(grpc_address) as channel:
        stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()


def test_grpc_unknown_model_or_version_is_not_found(grpc_client, cat_jpeg):
    for name, version in (("resnet", ""), (MODEL, "999")):
        with pytest.raises(InferenceServerException) as raised:
            grpc_client.infer(name, [image_input(grpcclient, [cat_jpeg])], model_version=version)
        assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_triton_only_rpcs_are_unimplemented(grpc_client):
    with pytest.raises(InferenceServerException) as raised:
        grpc_client.get_model_config(MODEL)
    assert raised.value.status() == "StatusCode.UNIMPLEMENTED"


def test_grpc_reflection_describes_the_service(grpc_address):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in set(database.get_services())
        assert database.FindFileContainingSymbol("inference.GRPCInferenceService").name


# --- plain requests ------------------------------------------------------------


def test_rest_json_base64_and_b64_objects(infer_url, http_address, serving_version, cat_jpeg, reference_classify):
    standard, urlsafe = base64.b64encode(cat_jpeg).decode(), base64.urlsafe_b64encode(cat_jpeg).decode()
    body = {
        "id": "plain-1",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [3], "data": [standard, urlsafe, {"b64": standard}]}
        ],
        "outputs": [{"name": "label"}],
    }
    url = f"http://{http_address}/v2/models/{MODEL}/versions/{serving_version}/infer"
    response = requests.post(url, json=body, headers={"X-Request-ID": "rid-kserve"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "rid-kserve"
    assert response.json() == {
        "model_name": MODEL,
        "model_version": serving_version,
        "id": "plain-1",
        "parameters": {"warning": RANDOM_WARNING},  # the suite's model has random weights
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [3], "data": [reference_classify(cat_jpeg)["label"]] * 3}
        ],
    }


def test_rest_server_metadata_and_health(http_address):
    base = f"http://{http_address}/v2"
    server = requests.get(base, timeout=10, allow_redirects=False)
    assert server.json()["extensions"] == ["binary_tensor_data", "classification"]
    assert requests.get(f"{base}/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{base}/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{base}/models/{MODEL}/ready", timeout=10).json() == {"name": MODEL, "ready": True}


def test_rest_model_not_ready_says_why(http_address, serving_version):
    """4xx means not ready, as the protocol has it; the body says why, as every error here does."""
    missing = int(serving_version) + 100
    answer = requests.get(f"http://{http_address}/v2/models/{MODEL}/versions/{missing}/ready", timeout=10)
    assert answer.status_code == 400
    reason = f"Request for unknown model: '{MODEL}' version {missing} is not found"  # Triton's words
    assert answer.json() == {"name": MODEL, "ready": False, "error": reason}


def tensor(**fields) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="], **fields}]}


@pytest.mark.parametrize(
    "body",
    [
        tensor(name="pixels"),
        tensor(datatype="FP32", data=[1.0]),
        tensor(shape=[1, 1]),
        tensor(shape=[2]),
        tensor(shape="1"),
        tensor(data=["%%% not base64 %%%"]),
        tensor(),  # base64 of "hi": not an image
        tensor(data=[12]),
        tensor(data=[], shape=[0]),
        tensor(parameters={"binary_data_size": 10}),
        {**tensor(), "outputs": [{"name": "logits"}]},
        {**tensor(), "outputs": [{"name": "label", "parameters": {"classification": 3}}]},
        {**tensor(), "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}]},
        {"inputs": []},
        {"instances": ["aGk="]},
        [1, 2],
    ],
)
def test_rest_bad_tensors_are_400_with_message(infer_url, body):
    response = requests.post(infer_url, json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


@pytest.mark.parametrize(
    ("data", "header_length"),
    [
        (b"{not json", None),
        (b'{"inputs": []}', "99"),
        (b'{"inputs": []}\x00\x00', "-1"),
        (b'{"inputs": []}', "\u00b2"),  # a digit to str.isdigit, not to int
        (b'{"inputs": []}', "9" * 5000),  # past int's 4300 digits
    ],
)
def test_rest_malformed_body_is_400(infer_url, data, header_length):
    headers = {"Inference-Header-Content-Length": header_length} if header_length else {}
    response = requests.post(infer_url, data=data, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_rest_truncated_binary_element_is_400(infer_url, cat_jpeg):
    binary = struct.pack("<I", len(cat_jpeg) + 10) + cat_jpeg
    header = json.dumps(tensor(parameters={"binary_data_size": len(binary)}, data=None)).encode()
    response = requests.post(
        infer_url, data=header + binary, headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30
    )
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "path", ["/v2/models/resnet/infer", f"/v2/models/{MODEL}/versions/999/infer", "/v2/models/resnet"]
)
def test_rest_unknown_model_or_version_is_404(http_address, path):
    method = "post" if path.endswith("/infer") else "get"
    response = requests.request(method, f"http://{http_address}{path}", json=tensor(), timeout=10)
    assert response.status_code == 404
    assert "not found" in response.json()["error"]


def test_guards_read_the_doors_declarations():
    """The metrics label of a door's routes and its unguarded probes come from its ``Door``."""
    from inception_v3.guards import UNGUARDED_METHODS, UNGUARDED_PATHS, HttpGuard

    guard = HttpGuard(app=None, admission=None, max_body_bytes=1, retry_after_s=1, api_paths=frozenset({"/predict"}))
    assert guard.endpoint(f"/v2/models/{MODEL}/infer") == guard.endpoint("/v2") == "/v2"
    assert guard.endpoint(f"/v1/models/{MODEL}:predict") == "/v1/models"
    assert guard.endpoint("/v20/models") == "other"
    assert {"/v2/health/live", "/v2/health/ready"} <= UNGUARDED_PATHS
    assert "/inference.GRPCInferenceService/ServerReady" in UNGUARDED_METHODS
