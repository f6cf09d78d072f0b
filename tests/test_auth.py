"""Issue 16: API keys. With ``auth.api_keys_file`` set, every route of both doors but
health, metrics and the docs answers 401 / UNAUTHENTICATED without a valid
``Authorization: Bearer <key>``; the file is read again when it changes; the
project's client sends the key."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import schemathesis
from bentoml.grpc.v1 import service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from schemathesis import GenerationMode

from client import request_inception_v3 as client
from inception_v3.auth import ApiKeys
from inception_v3.availability import RunnerWatch
from inception_v3.guards import Admission, HttpGuard
from inception_v3.protocols.tfserving import pb as tfs
from tests.conftest import CAT_JPEG, WORK_DIR, split_address
from tests.test_faults import Stack, start_stack, stop_stack
from tests.test_openapi import OPERATIONS, check_conformance
from tests.test_refusals import Runner

CAT = CAT_JPEG.read_bytes()
KEY, OTHER_KEY, NEW_KEY = "k-" + "a" * 40, "k-" + "b" * 40, "k-" + "c" * 40
KEYS_FILE = WORK_DIR / "api-keys.txt"


def write_keys(path: Path, *keys: str) -> None:
    path.write_text("# one key per line\n\n" + "".join(f"{key}\n" for key in keys))


def test_keys_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    keys = ApiKeys(path, protect_health_and_metrics=False)
    assert not keys.allows(f"Bearer {KEY}")  # no file: no key is valid
    write_keys(path, KEY, OTHER_KEY)
    assert keys.allows(f"Bearer {KEY}") and keys.allows(f"bearer {OTHER_KEY}")
    for wrong in (None, "", KEY, f"Basic {KEY}", "Bearer ", f"Bearer {KEY}x", "Bearer # one key per line"):
        assert not keys.allows(wrong), wrong
    write_keys(path, NEW_KEY)
    assert keys.allows(f"Bearer {NEW_KEY}") and not keys.allows(f"Bearer {KEY}")


@pytest.mark.parametrize("protect", [False, True])
def test_open_routes(protect: bool) -> None:
    keys = ApiKeys(Path("/nonexistent"), protect_health_and_metrics=protect)
    assert keys.http_path_open("/") and keys.http_path_open("/docs.json") and keys.http_path_open("/static/x.js")
    assert keys.grpc_method_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    for path in ("/livez", "/readyz", "/healthz", "/metrics"):
        assert keys.http_path_open(path) is not protect
    assert keys.grpc_method_open("/grpc.health.v1.Health/Check") is not protect
    for path in ("/predict", "/predict_batch", "/v1/models/inception_v3", "/v2/models/inception_v3/infer", "/x"):
        assert not keys.http_path_open(path)
    assert not keys.grpc_method_open("/tensorflow.serving.PredictionService/Predict")


@pytest.fixture(scope="module")
def stack(saved_model: str) -> Iterator[Stack]:
    write_keys(KEYS_FILE, KEY)
    launched = start_stack("auth", {"services.inception_v3.auth": {"api_keys_file": str(KEYS_FILE)}})
    try:
        launched.wait_ready()
        yield launched
    finally:
        stop_stack(launched)


B64_CAT = base64.urlsafe_b64encode(CAT).decode()
HTTP_ROUTES = {
    # name: (method, path, body, content type, status with the right key)
    "predict": ("POST", "/predict", CAT, "image/jpeg", 200),
    "predict_batch": ("POST", "/predict_batch", json.dumps({"images": [B64_CAT]}).encode(), "application/json", 200),
    "tf serving predict": (
        "POST",
        "/v1/models/inception_v3:predict",
        json.dumps({"instances": [{"b64": B64_CAT}]}).encode(),
        "application/json",
        200,
    ),
    "tf serving metadata": ("GET", "/v1/models/inception_v3/metadata", b"", "", 200),
    "tf serving status": ("GET", "/v1/models/inception_v3", b"", "", 200),
    "unknown route": ("GET", "/no/such/route", b"", "", 404),
}


def http_call(stack: Stack, name: str, authorization: str | None) -> httpx.Response:
    method, path, body, content_type, _ = HTTP_ROUTES[name]
    headers = {"Content-Type": content_type} if content_type else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    return httpx.request(method, f"http://{stack.http}{path}", content=body, headers=headers, timeout=60)


def grpc_calls() -> dict[str, tuple[str, object]]:
    metadata_request = tfs.get_model_metadata_pb2.GetModelMetadataRequest()
    metadata_request.model_spec.name = "inception_v3"
    metadata_request.metadata_field.append("signature_def")
    predict = tfs.predict_pb2.PredictRequest()
    predict.model_spec.name = "inception_v3"
    predict.inputs["image"].dtype = tfs.types_pb2.DT_STRING
    predict.inputs["image"].string_val.append(B64_CAT.encode())
    status = tfs.get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "inception_v3"
    return {
        "BentoService/Call": (
            "/bentoml.grpc.v1.BentoService/Call",
            pb.Request(api_name="predict", file=pb.File(kind="image/jpeg", content=CAT)),
        ),
        "Predict": ("/tensorflow.serving.PredictionService/Predict", predict),
        "GetModelMetadata": ("/tensorflow.serving.PredictionService/GetModelMetadata", metadata_request),
        "GetModelStatus": ("/tensorflow.serving.ModelService/GetModelStatus", status),
    }


def grpc_call(stack: Stack, name: str, authorization: str | None) -> grpc.StatusCode:
    method, request = grpc_calls()[name]
    metadata = [("authorization", authorization)] if authorization is not None else None
    with grpc.insecure_channel(stack.grpc) as channel:
        call = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString())
        try:
            call(request, metadata=metadata, timeout=60)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


WRONG = [None, "", f"Bearer {OTHER_KEY}", f"Basic {KEY}", KEY]


@pytest.mark.servers
@pytest.mark.parametrize("name", list(HTTP_ROUTES))
def test_http_routes_need_a_key(stack: Stack, name: str) -> None:
    for authorization in WRONG:
        response = http_call(stack, name, authorization)
        assert response.status_code == 401, (authorization, response.text)
        assert "API key" in response.json()["error"] and response.headers["www-authenticate"] == "Bearer"
    assert http_call(stack, name, f"Bearer {KEY}").status_code == HTTP_ROUTES[name][4]


@pytest.mark.servers
@pytest.mark.parametrize("name", list(grpc_calls()))
def test_grpc_methods_need_a_key(stack: Stack, name: str) -> None:
    for authorization in WRONG:
        assert grpc_call(stack, name, authorization) == grpc.StatusCode.UNAUTHENTICATED, authorization
    assert grpc_call(stack, name, f"Bearer {KEY}") == grpc.StatusCode.OK


@pytest.mark.servers
def test_health_metrics_and_docs_stay_open(stack: Stack) -> None:
    for path in ("/livez", "/readyz", "/metrics", "/docs.json", "/"):
        assert httpx.get(f"http://{stack.http}{path}", timeout=30).status_code == 200, path
    with grpc.insecure_channel(stack.grpc) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.servers
def test_the_client_sends_its_key(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.classify_rest(CAT, *split_address(stack.http), 60, None, KEY)["label"]
    assert client.classify_grpc(CAT, *split_address(stack.grpc), 60, None, KEY)["label"]
    monkeypatch.setenv(client.API_KEY_ENV, KEY)
    assert client.parse_args([]).api_key == KEY
    with pytest.raises(client.ServiceError, match="401"):
        client.metadata_rest(*split_address(stack.http), 60, OTHER_KEY)


@pytest.mark.servers
def test_keys_rotate_without_a_restart(stack: Stack) -> None:
    try:
        time.sleep(0.01)  # a modification time of its own, whatever the file system's resolution
        write_keys(KEYS_FILE, NEW_KEY)
        assert http_call(stack, "predict", f"Bearer {KEY}").status_code == 401
        assert grpc_call(stack, "BentoService/Call", f"Bearer {KEY}") == grpc.StatusCode.UNAUTHENTICATED
        assert http_call(stack, "predict", f"Bearer {NEW_KEY}").status_code == 200
        assert grpc_call(stack, "BentoService/Call", f"Bearer {NEW_KEY}") == grpc.StatusCode.OK
    finally:
        write_keys(KEYS_FILE, KEY)
    log = stack.log.read_text()
    assert all(key not in log for key in (KEY, OTHER_KEY, NEW_KEY))


@pytest.mark.parametrize("protect", [False, True])
def test_health_needs_a_key_when_protected(tmp_path: Path, protect: bool) -> None:
    """The HTTP guard in front of a stand-in app: /readyz without a key."""
    write_keys(tmp_path / "keys", KEY)
    keys = ApiKeys(tmp_path / "keys", protect_health_and_metrics=protect)
    guard = HttpGuard(
        lambda *_: None, Admission("http", 1, 1, RunnerWatch([Runner(True)])), 1, 1, frozenset(), keys=keys
    )
    sent: list[dict] = []

    async def call() -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await guard({"type": "http", "method": "GET", "path": "/readyz", "headers": []}, receive, send)
        if guard.admission.runner.task:
            guard.admission.runner.task.cancel()

    asyncio.run(call())
    assert sent[0]["status"] == (401 if protect else 200)


@pytest.mark.servers
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_conforms_to_the_document_with_a_key(stack: Stack, method: str, path: str) -> None:
    """Schemathesis over every documented route of a server with API keys on, sending the right key."""
    schema = schemathesis.openapi.from_url(f"http://{stack.http}/docs.json")  # the docs stay open
    check_conformance(
        schema, method, path, GenerationMode.POSITIVE, max_examples=10, headers={"Authorization": f"Bearer {KEY}"}
    )
