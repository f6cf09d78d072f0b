"""Issue 6 against real servers: bad input gets a clear 4xx and the server goes on
serving; odd but valid images are classified as in process; overload is shed
with 503 / UNAVAILABLE instead of queueing; memory stays flat over a soak; and a
``python -m inception_v3.launcher`` server (``make serve``: HTTP and gRPC, in each
runner mode) answers as in process on both doors, is warm when ready, logs where
the model runs and request ids, exports metrics on both doors and OpenTelemetry
spans, and drains in-flight requests on SIGTERM, leaving no process."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import http.client
import http.server
import json
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bentoml
import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import numpy as np
import psutil
import pytest
from bentoml.grpc.v1 import service_pb2 as pb
from bentoml.grpc.v1 import service_pb2_grpc
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from client import request_inception_v3 as client
from inception_v3 import engines
from inception_v3.settings import load_settings, read_settings
from tests.conftest import CAT_JPEG, split_address, start_launcher
from tests.images import (
    bmp_declaring,
    encode,
    jpeg_declaring,
    jpeg_declaring_bits,
    jpeg_with_repeated_scans,
    picture,
    png_bomb,
    png_header_only,
    unsupported_samples,
    valid_samples,
)

pytestmark = pytest.mark.servers

SETTINGS = load_settings()
CAT = CAT_JPEG.read_bytes()
SAMPLES = valid_samples()
BMP_HOLDING_A_PNG = bmp_declaring(96, 64, 0, 5, encode(picture(), "PNG"))
SCAN_BOMB = jpeg_with_repeated_scans(encode(picture(), "JPEG", progressive=True), 3000)
TIMEOUT_S = 120  # generous: the box is shared; no test here measures speed


# --- HTTP: bad input -----------------------------------------------------------


def multipart(body: bytes, boundary: str = "xyz") -> tuple[bytes, dict[str, str]]:
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


JSON = {"Content-Type": "application/json"}
HTTP_BAD_INPUT: dict[str, tuple[str, bytes, dict[str, str | bytes], int]] = {
    # name: (path, body, headers, expected status)
    "empty body": ("/predict", b"", {"Content-Type": "image/jpeg"}, 400),
    "text as jpeg": ("/predict", b"hello, world", {"Content-Type": "image/jpeg"}, 415),
    "truncated jpeg": ("/predict", CAT[: len(CAT) // 2], {"Content-Type": "image/jpeg"}, 400),
    "jpeg header only": ("/predict", CAT[:600], {"Content-Type": "image/jpeg"}, 400),
    "truncated png": ("/predict", SAMPLES["png-rgba"][:150], {"Content-Type": "image/png"}, 400),
    "no content type": ("/predict", CAT, {}, 415),
    "wrong content type": ("/predict", CAT, {"Content-Type": "text/plain"}, 415),
    "content type not ascii": ("/predict", CAT, {"Content-Type": b"image/jpeg; name=\xe9"}, 400),
    "multipart boundary not ascii": ("/predict", CAT, {"Content-Type": b"multipart/form-data; boundary=\xe9"}, 400),
    "tf serving content type not ascii": ("/v1/models/inception_v3:predict", b"{}", {"Content-Type": b"\xe9"}, 400),
    "unknown route, content type not ascii": ("/nope", b"", {"Content-Type": b"a\xe9"}, 400),
    "json content type": ("/predict", b'{"image": "cat"}', JSON, 415),
    "tiff": ("/predict", unsupported_samples()["tiff"], {"Content-Type": "image/tiff"}, 415),
    "12-bit jpeg": ("/predict", jpeg_declaring_bits(CAT, 12), {"Content-Type": "image/jpeg"}, 415),
    "jpeg of 0x0 pixels": ("/predict", jpeg_declaring(0, 0), {"Content-Type": "image/jpeg"}, 400),
    "bmp holding a png": ("/predict", BMP_HOLDING_A_PNG, {"Content-Type": "image/bmp"}, 415),
    "jpeg of 3000 scans": ("/predict", SCAN_BOMB, {"Content-Type": "image/jpeg"}, 413),
    "pdf as png": ("/predict", unsupported_samples()["pdf"], {"Content-Type": "image/png"}, 415),
    "png bomb 30000x30000": ("/predict", png_bomb(30000), {"Content-Type": "image/png"}, 413),
    "over the pixel limit": ("/predict", png_header_only(7000, 7000), {"Content-Type": "image/png"}, 413),
    "malformed multipart": ("/predict", *multipart(b"garbage"), 400),
    "multipart without boundary": ("/predict", b"garbage", {"Content-Type": "multipart/form-data"}, 400),
    "multipart without file": (
        "/predict",
        *multipart(b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--xyz--\r\n'),
        400,
    ),
    "top_k zero": ("/predict?top_k=0", CAT, {"Content-Type": "image/jpeg"}, 400),
    "top_k text": ("/predict?top_k=abc", CAT, {"Content-Type": "image/jpeg"}, 400),
    "top_k empty": ("/predict?top_k=", CAT, {"Content-Type": "image/jpeg"}, 400),
    "top_k superscript digit": ("/predict?top_k=%C2%B2", CAT, {"Content-Type": "image/jpeg"}, 400),
    "top_k past int's 4300 digits": ("/predict?top_k=" + "9" * 5000, CAT, {"Content-Type": "image/jpeg"}, 400),
    "version superscript digit": ("/predict?version=%C2%B2", CAT, {"Content-Type": "image/jpeg"}, 400),
    "batch bad base64": ("/predict_batch", b'{"images": ["!!not base64!!"]}', JSON, 400),
    "batch no images": ("/predict_batch", b'{"images": []}', JSON, 400),
    "batch not json": ("/predict_batch", b"{images", JSON, 400),
    "batch not utf-8": ("/predict_batch", b"\xc2\x00\xff{", JSON, 400),
    "batch nested too deep": ("/predict_batch", b"[" * 100_000, JSON, 400),
    "batch integer of 5000 digits": ("/predict_batch", b'{"top_k": 1' + b"0" * 5000 + b"}", JSON, 400),
    "batch not an image": (
        "/predict_batch",
        b'{"images": ["' + base64.b64encode(b"hello") + b'"]}',
        JSON,
        415,
    ),
    "batch too many images": (
        "/predict_batch",
        b'{"images": [' + b",".join([b'"' + base64.b64encode(SAMPLES["png"]) + b'"'] * 17) + b"]}",
        JSON,
        400,
    ),
    "tf serving bad base64": (
        "/v1/models/inception_v3:predict",
        b'{"instances": [{"b64": "!!not base64!!"}]}',
        JSON,
        400,
    ),
    "tf serving tiff": (
        "/v1/models/inception_v3:predict",
        b'{"instances": [{"b64": "' + base64.b64encode(unsupported_samples()["tiff"]) + b'"}]}',
        JSON,
        400,
    ),
    "tf serving not json": ("/v1/models/inception_v3:predict", b"{", JSON, 400),
    "tf serving no inputs": ("/v1/models/inception_v3:predict", b"{}", JSON, 400),
    "tf serving nested too deep": ("/v1/models/inception_v3:predict", b"[" * 100_000, JSON, 400),
    "tf serving unknown model": (
        "/v1/models/resnet:predict",
        b'{"instances": []}',
        JSON,
        404,
    ),
    "body over the size limit": (
        "/predict",
        b"\xff\xd8" + b"\0" * SETTINGS.max_body_bytes,
        {"Content-Type": "image/jpeg"},
        413,
    ),
}


@pytest.mark.parametrize("name", list(HTTP_BAD_INPUT))
def test_http_bad_input_gets_a_json_4xx(http_address: str, name: str) -> None:
    path, body, headers, status = HTTP_BAD_INPUT[name]
    response = httpx.post(f"http://{http_address}{path}", content=body, headers=headers, timeout=TIMEOUT_S)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/livez", "/metrics", "/docs.json"])
def test_a_content_type_that_is_not_ascii_is_400_on_the_unguarded_routes_too(http_address: str, path: str) -> None:
    """BentoML's access log decodes it once the answer has started: a 500, or a 200 cut short."""
    response = httpx.get(f"http://{http_address}{path}", headers={"Content-Type": b"text/\xe9"}, timeout=TIMEOUT_S)
    assert response.status_code == 400 and response.json() == {"error": "the Content-Type header must be ASCII text"}
    assert httpx.get(f"http://{http_address}{path}", timeout=TIMEOUT_S).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", "/livez", 405),
        ("POST", "/readyz", 405),
        ("DELETE", "/metrics", 405),
        ("POST", "/docs.json", 405),
        ("GET", "/static/nope", 404),
    ],
)
def test_the_unguarded_routes_answer_errors_as_json_too(http_address: str, method: str, path: str, status: int) -> None:
    response = httpx.request(method, f"http://{http_address}{path}", timeout=TIMEOUT_S)
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str) and response.json()["error"]


def test_readiness_answers_get_and_head_and_refuses_the_rest(http_address: str) -> None:
    assert httpx.get(f"http://{http_address}/readyz", timeout=TIMEOUT_S).status_code == 200
    assert httpx.head(f"http://{http_address}/readyz", timeout=TIMEOUT_S).status_code == 200
    response = httpx.post(f"http://{http_address}/readyz", content=b"x", timeout=TIMEOUT_S)
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/predict", "/v1/models/inception_v3:predict"])
def test_http_chunked_body_over_the_size_limit(http_address: str, path: str) -> None:
    """No Content-Length to refuse up front: the body is counted as it arrives."""

    def chunks() -> Iterator[bytes]:
        for _ in range(SETTINGS.max_body_bytes // 1_000_000 + 2):
            yield b"\0" * 1_000_000

    response = httpx.post(
        f"http://{http_address}{path}", content=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT_S
    )
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["error"]


def test_http_still_serves_after_bad_input(http_address: str, reference_classify: Callable[..., dict]) -> None:
    test_http_bad_input_gets_a_json_4xx(http_address, "truncated jpeg")
    response = post_image(http_address, CAT)
    assert response.status_code == 200
    assert response.json()["label"] == reference_classify(CAT)["label"]


# --- HTTP: valid but odd images ---------------------------------------------------------


def post_image(http_address: str, image: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"http://{http_address}/predict",
        content=image,
        headers={"Content-Type": "image/jpeg", **headers},  # the service reads the bytes, not the type
        timeout=TIMEOUT_S,
    )


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_http_odd_but_valid_images_are_classified_as_in_process(
    http_address: str, reference_classify: Callable[..., dict], name: str
) -> None:
    response = post_image(http_address, SAMPLES[name])
    assert response.status_code == 200, response.text
    expected = reference_classify(SAMPLES[name])
    assert response.json()["label"] == expected["label"]
    assert response.json()["score"] == pytest.approx(expected["score"], rel=1e-4)


def test_http_exif_rotated_photo_answers_as_the_upright_one(http_address: str) -> None:
    """A lossless file, so the rotated and the upright one give exactly the same pixels."""
    upright = picture()
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees clockwise to show
    rotated = encode(upright.transpose(Image.Transpose.ROTATE_270), "PNG", exif=exif.tobytes())
    assert post_image(http_address, rotated).json() == post_image(http_address, encode(upright, "PNG")).json()


def test_http_swagger_upload_as_multipart(http_address: str, reference_classify: Callable[..., dict]) -> None:
    response = httpx.post(
        f"http://{http_address}/predict", files={"image": ("cat.jpg", CAT, "image/jpeg")}, timeout=TIMEOUT_S
    )
    assert response.status_code == 200, response.text
    assert response.json()["label"] == reference_classify(CAT)["label"]


# --- gRPC: bad input --------------------------------------------------------------------


def grpc_call(address: str, request: Any, metadata: list[tuple[str, str]] | None = None) -> tuple[str, Any]:
    """(status name, answer as a dict or the error details)."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        try:
            response = service_pb2_grpc.BentoServiceStub(channel).Call(request, timeout=TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as error:
            return error.code().name, error.details()
    return "OK", MessageToDict(response.json)


def raw_grpc_call(address: str, method: str, data: bytes) -> tuple[str, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(method)(data, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            return error.code().name, error.details()
    return "OK", ""


def image_request(content: bytes, api_name: str = "predict") -> Any:
    return pb.Request(api_name=api_name, file=pb.File(kind="image/jpeg", content=content))


def batch_request_with_top_k(top_k: float) -> Any:
    """A Struct number JSON cannot hold (NaN, infinity) is a gRPC client's to send."""
    body = ParseDict({"images": ["a"]}, struct_pb2.Value())
    body.struct_value.fields["top_k"].number_value = top_k
    return pb.Request(api_name="predict_batch", json=body)


GRPC_BAD_INPUT: dict[str, tuple[Any, list[tuple[str, str]] | None, str]] = {
    "empty file": (image_request(b""), None, "INVALID_ARGUMENT"),
    "text": (image_request(b"hello, world"), None, "INVALID_ARGUMENT"),
    "truncated jpeg": (image_request(CAT[: len(CAT) // 2]), None, "INVALID_ARGUMENT"),
    "tiff": (image_request(unsupported_samples()["tiff"]), None, "INVALID_ARGUMENT"),
    "12-bit jpeg": (image_request(jpeg_declaring_bits(CAT, 12)), None, "INVALID_ARGUMENT"),
    "jpeg wider than libjpeg reads": (image_request(jpeg_declaring(65501, 16)), None, "RESOURCE_EXHAUSTED"),
    "bmp holding a png": (image_request(BMP_HOLDING_A_PNG), None, "INVALID_ARGUMENT"),
    "jpeg of 3000 scans": (image_request(SCAN_BOMB), None, "RESOURCE_EXHAUSTED"),
    "png bomb 30000x30000": (image_request(png_bomb(30000)), None, "RESOURCE_EXHAUSTED"),
    "over the pixel limit": (image_request(png_header_only(7000, 7000)), None, "RESOURCE_EXHAUSTED"),
    "unknown api": (image_request(CAT, api_name="no_such_api"), None, "INVALID_ARGUMENT"),
    "no input field": (pb.Request(api_name="predict"), None, "INVALID_ARGUMENT"),
    "bad top_k": (image_request(CAT), [("top_k", "many")], "INVALID_ARGUMENT"),
    "top_k past int's 4300 digits": (image_request(CAT), [("top_k", "9" * 5000)], "INVALID_ARGUMENT"),
    "batch with a NaN": (batch_request_with_top_k(float("nan")), None, "INVALID_ARGUMENT"),
    "batch with an infinity": (batch_request_with_top_k(float("inf")), None, "INVALID_ARGUMENT"),
    "message over the size limit": (image_request(b"\0" * (SETTINGS.max_body_bytes + 1)), None, "RESOURCE_EXHAUSTED"),
}


def unary_call_over_h2(address: str, method: str, message: bytes, metadata: list[tuple[str, str]]) -> dict[str, str]:
    """A unary gRPC call written with h2, for metadata grpcio refuses to send: the answer's
    trailers (with ``grpc-status``), or ``{}`` if the stream ended without them."""
    host, port = split_address(address)
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8", validate_outbound_headers=False)
    )
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "http"), (":path", method), (":authority", address)]
        connection.send_headers(stream, [*head, ("content-type", "application/grpc"), ("te", "trailers"), *metadata])
        framed = struct.pack(">BI", 0, len(message)) + message  # not compressed, length, message
        while framed:
            sock.sendall(connection.data_to_send())
            window = min(connection.local_flow_control_window(stream), connection.max_outbound_frame_size)
            if window == 0:
                connection.receive_data(sock.recv(65536))
                continue
            connection.send_data(stream, framed[:window], end_stream=len(framed) <= window)
            framed = framed[window:]
        sock.sendall(connection.data_to_send())
        while data := sock.recv(65536):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    connection.acknowledge_received_data(event.flow_controlled_length, stream)
                if isinstance(event, h2.events.TrailersReceived):
                    return dict(event.headers)
                if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return {}
            sock.sendall(connection.data_to_send())
    return {}


@pytest.mark.parametrize("sent", ["caf\u00e9", "a\x7f"])
def test_a_request_id_grpc_cannot_send_back_gets_a_new_one(grpc_address: str, sent: str) -> None:
    """grpcio dropped the call's answer (the client waited for its deadline) and logged a traceback."""
    call = "/bentoml.grpc.v1.BentoService/Call"
    trailers = unary_call_over_h2(grpc_address, call, image_request(CAT).SerializeToString(), [("x-request-id", sent)])
    assert trailers.get("grpc-status") == "0", trailers
    assert re.fullmatch("[0-9a-f]{32}", trailers["x-request-id"])


def test_a_request_id_of_other_than_printable_ascii_gets_a_new_one_over_http(http_address: str) -> None:
    headers = {"Content-Type": "image/jpeg", "X-Request-ID": "café".encode("latin-1")}
    response = httpx.post(f"http://{http_address}/predict", content=CAT, headers=headers, timeout=TIMEOUT_S)
    assert response.status_code == 200
    assert re.fullmatch("[0-9a-f]{32}", response.headers["x-request-id"])


@pytest.mark.parametrize("name", list(GRPC_BAD_INPUT))
def test_grpc_bad_input_gets_its_status(grpc_address: str, name: str) -> None:
    request, metadata, expected = GRPC_BAD_INPUT[name]
    code, details = grpc_call(grpc_address, request, metadata)
    assert code == expected, details
    assert details


@pytest.mark.parametrize(
    ("body", "problems"),
    [
        ({"pictures": []}, "images: Field required"),
        ([{"images": []}], "the body should be a JSON object"),
        (
            {"images": [1], "top_k": 0},
            "images.0: Input should be a valid string; top_k: Input should be greater than or equal to 1",
        ),
    ],
)
def test_a_batch_request_the_schema_refuses_names_each_field(
    http_address: str, grpc_address: str, body: Any, problems: str
) -> None:
    """One line, on both doors: not pydantic's report, which echoes the input and links to its documentation."""
    expected = f"Invalid JSON input received: {problems}"
    response = httpx.post(f"http://{http_address}/predict_batch", json=body, timeout=TIMEOUT_S)
    assert (response.status_code, response.json()) == (400, {"error": expected})
    request = pb.Request(api_name="predict_batch", json=ParseDict(body, struct_pb2.Value()))
    assert grpc_call(grpc_address, request) == ("INVALID_ARGUMENT", expected)


@pytest.mark.parametrize(
    "method",
    [
        "/bentoml.grpc.v1.BentoService/Call",
        "/tensorflow.serving.PredictionService/Predict",
        "/inference.GRPCInferenceService/ModelInfer",
        # The methods outside the admission queue, of every kind (unary, server and bidirectional streams)
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
def test_grpc_undecodable_message_is_invalid_argument(grpc_address: str, method: str) -> None:
    code, details = raw_grpc_call(grpc_address, method, b"\xff\xff\xff\x01 not a protobuf message")
    assert code == "INVALID_ARGUMENT", details
    assert "malformed request message" in details


def test_grpc_health_watch_and_reflection_still_answer(grpc_address: str) -> None:
    """The streaming methods, wrapped to refuse undecodable requests, answer decodable ones as before."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(grpc_address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        asked = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        (listed,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(asked, timeout=TIMEOUT_S)
    assert "grpc.health.v1.Health" in {service.name for service in listed.list_services_response.service}


def test_grpc_tf_serving_bad_base64_is_invalid_argument(grpc_address: str) -> None:
    from inception_v3.protocols.tfserving import pb as tfs

    request = tfs.predict_pb2.PredictRequest()
    request.model_spec.name = "inception_v3"
    request.inputs["image"].dtype = tfs.types_pb2.DT_STRING
    request.inputs["image"].string_val.append(b"!!not base64!!")
    with grpc.insecure_channel(grpc_address) as channel:
        stub = tfs.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(request, timeout=TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["jpeg-cmyk", "png-16bit-rgb", "gif-animated", "jpeg-exif-rotated", "webp-alpha"])
def test_grpc_odd_but_valid_images_are_classified_as_in_process(
    grpc_address: str, reference_classify: Callable[..., dict], name: str
) -> None:
    code, answer = grpc_call(grpc_address, image_request(SAMPLES[name]))
    assert code == "OK", answer
    assert answer["label"] == reference_classify(SAMPLES[name])["label"]


def test_grpc_still_serves_after_bad_input(grpc_address: str) -> None:
    assert grpc_call(grpc_address, image_request(b"junk"))[0] == "INVALID_ARGUMENT"
    assert grpc_call(grpc_address, image_request(CAT))[0] == "OK"


# --- overload and soak --------------------------------------------------------------------

OVERLOAD_CLIENTS = 64
REQUESTS_PER_CLIENT = 3


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(name: str, outcomes: list[tuple[str, float]]) -> None:
    counts = Counter(status for status, _ in outcomes)
    latency = {
        status: f"p50 {percentile([s for st, s in outcomes if st == status], 50):.3f} s, "
        f"p99 {percentile([s for st, s in outcomes if st == status], 99):.3f} s"
        for status in counts
    }
    print(f"\n{name}: {dict(counts)} {latency}")


def run_clients(client: Callable[[], list[tuple[str, float, str | None]]]) -> list[tuple[str, float, str | None]]:
    with concurrent.futures.ThreadPoolExecutor(OVERLOAD_CLIENTS) as pool:
        futures = [pool.submit(client) for _ in range(OVERLOAD_CLIENTS)]
        return [outcome for future in futures for outcome in future.result()]


def test_http_overload_is_shed_with_503_and_retry_after(http_address: str) -> None:
    """64 clients, each sending its next request as soon as it has an answer."""

    def client() -> list[tuple[str, float, str | None]]:
        outcomes = []
        with httpx.Client(timeout=TIMEOUT_S) as session:
            for _ in range(REQUESTS_PER_CLIENT):
                started = time.perf_counter()
                response = session.post(
                    f"http://{http_address}/predict", content=CAT, headers={"Content-Type": "image/jpeg"}
                )
                outcomes.append(
                    (str(response.status_code), time.perf_counter() - started, response.headers.get("retry-after"))
                )
        return outcomes

    outcomes = run_clients(client)
    report("HTTP overload", [(status, seconds) for status, seconds, _ in outcomes])
    assert len(outcomes) == OVERLOAD_CLIENTS * REQUESTS_PER_CLIENT  # none lost: a client error would have raised
    statuses = Counter(status for status, _, _ in outcomes)
    assert set(statuses) == {"200", "503"}, statuses
    assert all(retry == str(SETTINGS.retry_after_s) for status, _, retry in outcomes if status == "503")


def test_grpc_overload_is_shed_with_unavailable(grpc_address: str) -> None:
    def client() -> list[tuple[str, float, str | None]]:
        outcomes = []
        with grpc.insecure_channel(grpc_address) as channel:
            stub = service_pb2_grpc.BentoServiceStub(channel)
            for _ in range(REQUESTS_PER_CLIENT):
                started = time.perf_counter()
                try:
                    stub.Call(image_request(CAT), timeout=TIMEOUT_S)
                    outcomes.append(("OK", time.perf_counter() - started, None))
                except grpc.RpcError as error:
                    pushback = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    outcomes.append((error.code().name, time.perf_counter() - started, pushback))
        return outcomes

    outcomes = run_clients(client)
    report("gRPC overload", [(status, seconds) for status, seconds, _ in outcomes])
    assert len(outcomes) == OVERLOAD_CLIENTS * REQUESTS_PER_CLIENT
    statuses = Counter(status for status, _, _ in outcomes)
    assert set(statuses) == {"OK", "UNAVAILABLE"}, statuses
    pushbacks = {pushback for status, _, pushback in outcomes if status == "UNAVAILABLE"}
    assert pushbacks == {str(SETTINGS.retry_after_s * 1000)}


SOAK_REQUESTS = 2000
SOAK_WARMUP = 200
SOAK_CLIENTS = 8
# One request in four is classified (a tiny PNG): the model's rate on 2 cores bounds
# the test's time; the others take the decode and error paths (400, 413, 415).
SOAK_MIX = (
    (encode(picture(64, 64), "PNG"), 200),
    (CAT[:600], 400),
    (b"not an image", 415),
    (png_header_only(7000, 7000), 413),
)


def server_processes(port: int) -> dict[str, psutil.Process]:
    """The API worker and (``runner: shared``) the runner worker of the ``bentoml serve`` on ``port``."""
    (server,) = [
        process
        for process in psutil.process_iter(["cmdline"])
        if "serve" in (process.info["cmdline"] or []) and str(port) in (process.info["cmdline"] or [])
    ]
    workers = {}
    for child in server.children(recursive=True):
        command = " ".join(child.cmdline())
        if "http_api_server" in command:
            workers["api"] = child
        elif "worker.runner" in command:
            workers["runner"] = child
    assert "api" in workers, workers
    return workers


def soak(http_address: str, count: int) -> Counter[int]:
    """``count`` requests from ``SOAK_CLIENTS`` clients, cycling through ``SOAK_MIX``; their statuses."""

    def client(offset: int) -> Counter[int]:
        statuses: Counter[int] = Counter()
        with httpx.Client(timeout=TIMEOUT_S) as session:
            for n in range(offset, count, SOAK_CLIENTS):
                body, expected = SOAK_MIX[n % len(SOAK_MIX)]
                response = session.post(
                    f"http://{http_address}/predict", content=body, headers={"Content-Type": "image/png"}
                )
                statuses[response.status_code] += 1
                assert response.status_code == expected, response.text
        return statuses

    with concurrent.futures.ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        return sum(pool.map(client, range(SOAK_CLIENTS)), Counter())


def test_soak_memory_stays_flat(http_address: str) -> None:
    """2000 requests; resident memory after them is near what it was after a warm-up."""
    workers = server_processes(split_address(http_address)[1])
    soak(http_address, SOAK_WARMUP)
    before = {name: process.memory_info().rss for name, process in workers.items()}
    statuses = soak(http_address, SOAK_REQUESTS)
    after = {name: process.memory_info().rss for name, process in workers.items()}
    assert statuses == {status: SOAK_REQUESTS // len(SOAK_MIX) for _, status in SOAK_MIX}
    growth_mib = {name: (after[name] - before[name]) / 2**20 for name in workers}
    print(
        "\nsoak RSS MiB before/after: "
        + ", ".join(f"{n} {before[n] / 2**20:.0f} -> {after[n] / 2**20:.0f}" for n in workers)
    )
    # An embedded runner (runner: auto on a CPU) puts the model and its batches in the API worker.
    limits_mib = {"api": 32, "runner": 64} if "runner" in workers else {"api": 64}
    assert all(growth_mib[name] < limits_mib[name] for name in workers), growth_mib


# --- one launcher server: readiness, logs, metrics, tracing, shutdown -----------------


DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there


class SpanCollector(http.server.ThreadingHTTPServer):
    """An OpenTelemetry collector's OTLP/HTTP trace endpoint, keeping (trace id, span name) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                body = self.rfile.read(int(self.headers["Content-Length"]))
                for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend((span.trace_id.hex(), span.name) for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://localhost:{self.server_address[1]}/v1/traces"  # localhost: exempt from the launcher's proxy


@dataclasses.dataclass
class Launched:
    process: subprocess.Popen[bytes]
    http: str
    grpc: str
    grpc_metrics: str
    log: Path
    collector: SpanCollector
    shared_runner: bool

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout_s: float = 30) -> str:
        """The first log line holding ``needle``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = [line for line in self.log_text().splitlines() if needle in line]
            if lines:
                return lines[0]
            time.sleep(0.2)
        raise AssertionError(f"no log line with {needle!r} after {timeout_s} s")


LAUNCHED_API_WORKERS = 2


@pytest.fixture(scope="module", params=["auto", "shared"])
def launched(saved_model: str, request: pytest.FixtureRequest) -> Iterator[Launched]:
    """The launcher on free ports, in a BentoML home of its own (its metrics directory is
    wiped at start), sharing the test model store, with spans sent to a local collector
    and two API workers per server (the configuration's count must reach both servers),
    with each ``runner`` mode (auto, the default: embedded on a CPU).
    Its environment names an HTTP proxy that does not answer, with only ``localhost``
    exempt, as containers behind a corporate proxy often have."""
    from inception_v3.launcher import wait_ready

    collector = SpanCollector()
    launch = start_launcher(
        f"launcher-{request.param}",
        {
            "services.inception_v3.runner": request.param,
            "api_server.workers": LAUNCHED_API_WORKERS,
            "tracing": {
                "exporter_type": "otlp",
                "sample_rate": 1.0,
                "otlp": {"protocol": "http", "endpoint": collector.endpoint},
            },
        },
        env={
            **{name: DEAD_PROXY for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")},
            **{name: "localhost" for name in ("no_proxy", "NO_PROXY")},
        },
    )
    process, config, log = launch.process, launch.config, launch.log
    settings = dataclasses.replace(
        SETTINGS, http_port=config["api_server"]["http"]["port"], grpc_port=config["api_server"]["grpc"]["port"]
    )
    try:
        deadline = time.monotonic() + 300
        while not wait_ready(settings, timeout_s=5):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        yield Launched(
            process,
            http=f"127.0.0.1:{settings.http_port}",
            grpc=f"127.0.0.1:{settings.grpc_port}",
            grpc_metrics=f"127.0.0.1:{config['api_server']['grpc']['metrics']['port']}",
            log=log,
            collector=collector,
            shared_runner=not read_settings(launch.config_file).embedded_runner,
        )
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            process.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(tree, timeout=60)
            for leftover in alive:
                leftover.kill()
        collector.shutdown()


def test_launcher_serves_both_protocols_from_one_runner_or_a_model_in_each(
    launched: Launched, reference_classify: Callable[..., dict]
) -> None:
    """Also with a dead proxy in the launcher's environment: the API workers reach a shared
    runner at 127.0.0.1 directly (BentoML's runner client sent it through the proxy,
    and every request got a 500)."""
    expected = reference_classify(CAT)["label"]
    assert client.classify_rest(CAT, *split_address(launched.http), 30, None)["label"] == expected
    assert client.classify_grpc(CAT, *split_address(launched.grpc), 30, None)["label"] == expected
    launcher = psutil.Process(launched.process.pid)
    workers = [" ".join(p.cmdline()) for p in launcher.children(recursive=True)]
    assert sum("bentoml_cli.worker.runner" in w for w in workers) == launched.shared_runner, workers
    assert sum("bentoml_cli.worker.http_api_server" in w for w in workers) == 2, workers
    assert sum("bentoml_cli.worker.grpc_api_server" in w for w in workers) == 2, workers
    # BentoML's workers are the launcher's own children: no circus supervisor between them (inception_v3.workers).
    assert not any("bentoml_cli._internal.start" in w for w in workers), workers
    assert launcher.children(recursive=True) == launcher.children()


def test_launcher_logs_and_exports_what_runs_the_model(launched: Launched) -> None:
    choice = engines.choose_here("auto", "auto", bentoml.models.get("inception_v3:latest"))
    line = launched.wait_for_log(" loaded in ")
    pattern = (
        r"inception_v3:\w+ \(version \d+, weights: random\) runs on "
        + re.escape(choice.describe())
        + r"; loaded in [0-9.]+ s, warmed up in [0-9.]+ s"
    )
    assert re.search(pattern, line), line
    httpx.post(f"http://{launched.http}/predict", content=CAT, headers={"Content-Type": "image/jpeg"}, timeout=30)
    families = text_string_to_metric_families(httpx.get(f"http://{launched.http}/metrics").text)
    (engine,) = [sample for family in families if family.name == "inception_v3_engine" for sample in family.samples]
    expected = {"engine": "openvino", "precision": choice.precision, "device": "CPU"}
    assert engine.value == 1 and engine.labels == {**expected, "cpu_flags": " ".join(choice.cpu_flags)}


def test_launcher_is_warm_when_ready(launched: Launched) -> None:
    """The first requests after ready answer within a TF Serving client's default 5 s deadline."""
    response = httpx.post(
        f"http://{launched.http}/predict", content=CAT, headers={"Content-Type": "image/jpeg"}, timeout=5
    )
    assert response.status_code == 200
    with grpc.insecure_channel(launched.grpc) as channel:
        service_pb2_grpc.BentoServiceStub(channel).Call(image_request(CAT), timeout=5)


def test_launcher_logs_request_ids(launched: Launched) -> None:
    response = post_image(launched.http, CAT, **{"X-Request-ID": "hardening-http-ok"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "hardening-http-ok"
    assert "x-bentoml-request-id" not in response.headers  # one ID per answer: the one in the log
    assert "status=200" in launched.wait_for_log("request_id=hardening-http-ok")
    with grpc.insecure_channel(launched.grpc) as channel:
        stub = service_pb2_grpc.BentoServiceStub(channel)
        sent = [("x-request-id", "hardening-grpc-ok")]
        _, call = stub.Call.with_call(image_request(CAT), metadata=sent, timeout=TIMEOUT_S)
        assert ("x-request-id", "hardening-grpc-ok") in call.trailing_metadata()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Call(image_request(b"junk"), timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(dict(refused.value.trailing_metadata())["x-request-id"]) == 32  # a new one, as in the log
    assert "BentoService/Call" in launched.wait_for_log("request_id=hardening-grpc-ok")


def test_the_start_up_log_holds_no_library_notices(launched: Launched) -> None:
    """BentoML's notices that its legacy API (the one it serves gRPC for) is deprecated, protobuf's about
    BentoML's generated code, gRPC's C core at INFO: nothing an operator can act on."""
    text = launched.log_text()
    for notice in ("is deprecated since BentoML", "google.protobuf.service module is deprecated", "absl::"):
        assert notice not in text


def stalled_upload(address: str, path: str = "/predict") -> socket.socket:
    """A request whose headers and first kilobyte arrive, and then nothing (slowloris)."""
    host, port = split_address(address)
    connection = socket.create_connection((host, port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(CAT)}\r\n\r\n"
    connection.sendall(head.encode() + CAT[:1000])
    return connection


def test_stalled_uploads_hold_no_slot(launched: Launched) -> None:
    """More stalled bodies than slots and queue places together: the door still answers at once."""
    per_worker = SETTINGS.max_concurrency + SETTINGS.max_queue
    stalled = [stalled_upload(launched.http) for _ in range(LAUNCHED_API_WORKERS * per_worker + 8)]
    try:
        time.sleep(1)
        response = post_image(launched.http, CAT)
        assert response.status_code == 200, response.text
    finally:
        for connection in stalled:
            connection.close()


@pytest.mark.parametrize("padding", [b" ", b"\t"])
def test_a_content_length_with_whitespace_after_it_is_read(http_address: str, padding: bytes) -> None:
    """It was 413 "over the 20971520-byte limit"; the parser takes the value, as RFC 9110 has it."""
    host, port = split_address(http_address)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: %d%s\r\n\r\n"
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as connection:
        connection.sendall(head % (len(CAT), padding) + CAT)
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        assert answer.status == 200, answer.read()


def raw_exchange(address: str, request: bytes) -> bytes:
    """What the server sends for ``request`` until it closes the connection."""
    with socket.create_connection(split_address(address), timeout=TIMEOUT_S) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_a_body_refused_before_it_is_sent_is_not_asked_for(http_address: str) -> None:
    """``Expect: 100-continue`` (curl's past 1 MB): the 413 at once, not a 100 and then the 413
    once the body had been sent, or after 10 s of waiting for it; then the connection closes."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nExpect: 100-continue\r\n"
    started = time.monotonic()
    answer = raw_exchange(http_address, head + b"Content-Length: %d\r\n\r\n" % (50 << 20))
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("request_line", [b"GET /readyz HTTP/1.0", b"DELETE /readyz HTTP/1.0"])
def test_an_http_1_0_client_gets_no_chunks(http_address: str, request_line: bytes) -> None:
    """HTTP/1.0 has no chunked encoding: /readyz and the guard's refusals say their length."""
    head, _, body = raw_exchange(http_address, request_line + b"\r\n\r\n").partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"content-length: %d\r\n" % len(body) in head.lower() + b"\r\n"


def test_a_request_head_that_stops_is_408_and_a_silent_connection_closes(http_address: str) -> None:
    """uvicorn kept both open for good (slowloris on the head)."""
    limit = SETTINGS.head_limits.timeout_s
    with (
        socket.create_connection(split_address(http_address), timeout=limit + TIMEOUT_S) as half_head,
        socket.create_connection(split_address(http_address), timeout=limit + TIMEOUT_S) as silent,
    ):
        started = time.monotonic()
        half_head.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        answer = http.client.HTTPResponse(half_head)
        answer.begin()
        assert answer.status == 408
        assert json.loads(answer.read()) == {
            "error": f"no whole request head (request line and headers) within {limit} s"
        }
        assert silent.recv(1) == b""  # closed, with no answer to no request
        assert time.monotonic() - started < limit + 10
    assert post_image(http_address, CAT).status_code == 200


def test_a_request_head_over_the_limit_is_431(http_address: str) -> None:
    """uvicorn read any size: one 100 MB header held the event loop 5.8 s."""
    header = b"X-Padding: " + b"a" * SETTINGS.head_limits.max_bytes + b"\r\n"
    answer = raw_exchange(http_address, b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"content-type: application/json" in head
    assert json.loads(body) == {
        "error": f"request head (request line and headers) over {SETTINGS.head_limits.max_bytes} bytes"
    }
    assert (
        post_image(http_address, CAT, **{"X-Padding": "a" * (SETTINGS.head_limits.max_bytes // 2)}).status_code == 200
    )


@pytest.mark.parametrize(
    "request_head", [b"POST /predict HTTP/1.1\r\nContent-Length: abc", b"GET /readyz HTTP/9.9", b"GET /\x00 HTTP/1.1"]
)
def test_a_request_the_parser_cannot_read_is_400_in_json(http_address: str, request_head: bytes) -> None:
    head, _, body = raw_exchange(http_address, request_head + b"\r\nHost: x\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head
    assert "does not parse" in json.loads(body)["error"]


@pytest.mark.parametrize("upgrade", ["h2c", "websocket", "x"])
def test_an_upgrade_not_served_keeps_the_body(http_address: str, upgrade: str) -> None:
    """curl --http2 on http:// asks for h2c: httptools stopped at the Upgrade, and the image was lost
    (400 "empty request body"); a WebSocket handshake got a bare 400. Now served as HTTP/1.1."""
    upgrade_headers = {
        "Connection": "Upgrade, HTTP2-Settings",
        "Upgrade": upgrade,
        "HTTP2-Settings": "AAMAAABkAAQCAAAA",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    response = post_image(http_address, CAT, **upgrade_headers)
    assert response.status_code == 200, response.text
    assert response.json()["label"] == post_image(http_address, CAT).json()["label"]


def test_a_stalled_upload_is_408_at_the_request_timeout(http_address: str) -> None:
    """The client's fault, so not the 504 of a late answer; counted as a 408 (it was "cancelled");
    the door goes on serving."""

    def timed_out() -> float:
        samples = metric_samples(httpx.get(f"http://{http_address}/metrics", timeout=TIMEOUT_S).text)
        return metric_value(samples, "inception_v3_requests_total", endpoint="/predict", status="408")

    before = timed_out()
    connection = stalled_upload(http_address)
    connection.settimeout(SETTINGS.request_timeout_s + TIMEOUT_S)
    with connection:
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        assert answer.status == 408
        assert json.loads(answer.read()) == {
            "error": f"the request body did not arrive within {SETTINGS.request_timeout_s} s"
        }
    assert post_image(http_address, CAT).status_code == 200
    assert timed_out() == before + 1


def test_a_client_leaving_mid_body_is_cancelled_not_a_server_error(launched: Launched) -> None:
    for _ in range(5):
        stalled_upload(launched.http).close()
    time.sleep(1)
    samples = metric_samples(httpx.get(f"http://{launched.http}/metrics", timeout=TIMEOUT_S).text)
    answered = "inception_v3_requests_total"
    assert metric_value(samples, answered, protocol="http", endpoint="/predict", status="cancelled") >= 5
    assert metric_value(samples, answered, protocol="http", endpoint="/predict", status="500") == 0
    assert "ClientDisconnect" not in launched.log_text()


def test_launcher_logs_client_errors_as_one_line(launched: Launched) -> None:
    response = post_image(launched.http, CAT[:600], **{"X-Request-ID": "hardening-http-bad"})
    assert response.status_code == 400
    line = launched.wait_for_log("client error on /predict [POST]: 400")
    assert "[INFO]" in line and "request_id=hardening-http-bad" in line
    assert grpc_call(launched.grpc, image_request(b"junk"), [("x-request-id", "hardening-grpc-bad")])[0] != "OK"
    assert "[INFO]" in launched.wait_for_log("client error on /predict [POST]: 415")
    assert "Traceback" not in launched.log_text()


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(value for n, sample_labels, value in samples if n == name and labels.items() <= sample_labels.items())


def test_launcher_metrics_on_both_doors(launched: Launched) -> None:
    post_image(launched.http, b"junk")
    grpc_call(launched.grpc, image_request(CAT))
    for address in (launched.http + "/metrics", launched.grpc_metrics):
        samples = metric_samples(httpx.get(f"http://{address}", timeout=TIMEOUT_S).text)
        requests = "inception_v3_requests_total"
        assert metric_value(samples, requests, protocol="http", endpoint="/predict", status="200") >= 1
        assert metric_value(samples, requests, protocol="http", endpoint="/predict", status="415") >= 1
        call = "/bentoml.grpc.v1.BentoService/Call"
        assert metric_value(samples, requests, protocol="grpc", endpoint=call, status="OK") >= 1
        assert metric_value(samples, requests, protocol="grpc", endpoint=call, status="INVALID_ARGUMENT") >= 1
        assert metric_value(samples, "inception_v3_request_duration_seconds_count", protocol="grpc") >= 2
        assert {"http", "grpc"} <= {labels["protocol"] for n, labels, _ in samples if n == "inception_v3_in_flight"}
        assert metric_value(samples, "bentoml_runner_adaptive_batch_size_count") >= 1


def test_launcher_counts_the_open_inference_door(launched: Launched) -> None:
    """The Open Inference door shares the launcher's runner and metrics (endpoint: its ``Door``'s label)."""
    from tritonclient.grpc import service_pb2 as oip
    from tritonclient.grpc import service_pb2_grpc as oip_grpc

    bad_tensor = {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}
    assert httpx.post(f"http://{launched.http}/v2/models/inception_v3/infer", json=bad_tensor).status_code == 400
    request = oip.ModelInferRequest(model_name="inception_v3")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(CAT)
    with grpc.insecure_channel(launched.grpc) as channel:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT_S)
    for address in (launched.http + "/metrics", launched.grpc_metrics):
        samples = metric_samples(httpx.get(f"http://{address}", timeout=TIMEOUT_S).text)
        requests = "inception_v3_requests_total"
        assert metric_value(samples, requests, protocol="http", endpoint="/v2", status="400") >= 1
        infer = "/inference.GRPCInferenceService/ModelInfer"
        assert metric_value(samples, requests, protocol="grpc", endpoint=infer, status="OK") >= 1


def test_launcher_exports_traces(launched: Launched) -> None:
    """The log line's trace id is an exported trace: the API server's span and its call to
    a shared runner. That runner exports its own spans too, but BentoML 1.4 files the runner
    spans of later requests under the first request's trace, so they are not matched here."""
    line = launched.wait_for_log("request_id=hardening-http-ok")
    trace_id = line.split("trace=")[1].split(",")[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = {name for trace, name in launched.collector.spans if trace == trace_id}
        runner_spans = [name for _, name in launched.collector.spans if name.startswith("POST /classify")]
        if launched.shared_runner and {"POST /predict", "POST"} <= names and runner_spans:
            return
        if not launched.shared_runner and "POST /predict" in names:
            return
        time.sleep(0.5)
    raise AssertionError(f"trace {trace_id} not exported: {names}; runner spans: {len(runner_spans)}")


def test_launcher_sigterm_drains_in_flight_requests_and_leaves_no_process(launched: Launched) -> None:
    """Requests in flight on both doors when SIGTERM arrives are all answered; then
    every process exits, within the request timeout and the launcher's margin.

    The HTTP uploads trickle in over a few seconds, so they are in flight (their body
    still arriving: a request takes its slot once the body is in) whatever the model's
    speed; the gRPC calls are few enough to finish well within the request timeout on
    a slow, shared box."""
    tree = psutil.Process(launched.process.pid).children(recursive=True)
    uploads_started = threading.Barrier(3)
    uploads_sent: list[float] = []

    def trickled_upload() -> str:
        def chunks() -> Iterator[bytes]:
            uploads_started.wait(timeout=TIMEOUT_S)
            for start in range(0, len(CAT), len(CAT) // 10 + 1):
                time.sleep(0.3)
                yield CAT[start : start + len(CAT) // 10 + 1]
            uploads_sent.append(time.monotonic())

        url = f"http://{launched.http}/predict"
        return str(
            httpx.post(url, content=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT_S).status_code
        )

    def grpc_predict() -> str:
        return grpc_call(launched.grpc, image_request(CAT))[0]

    def grpc_answered(samples: list[tuple[str, dict[str, str], float]]) -> float:
        return metric_value(samples, "inception_v3_requests_total", protocol="grpc")

    answered_before = grpc_answered(metric_samples(httpx.get(f"http://{launched.http}/metrics").text))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(trickled_upload) for _ in range(2)] + [pool.submit(grpc_predict) for _ in range(12)]
        uploads_started.wait(timeout=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            samples = metric_samples(httpx.get(f"http://{launched.http}/metrics", timeout=TIMEOUT_S).text)
            in_flight = metric_value(samples, "inception_v3_in_flight", protocol="grpc")
            # Every gRPC call reached the server (one still on its way when SIGTERM came would be refused,
            # UNAVAILABLE, as a draining server must), and some are still being served.
            if in_flight and in_flight + grpc_answered(samples) - answered_before >= 12:
                break
            assert time.monotonic() < deadline, "requests never in flight"
            time.sleep(0.02)
        stopped = time.monotonic()
        launched.process.send_signal(signal.SIGTERM)
        results = [future.result() for future in futures]
    assert results == ["200"] * 2 + ["OK"] * 12
    assert len(uploads_sent) == 2 and min(uploads_sent) > stopped  # both bodies were still arriving
    exit_code = launched.process.wait(timeout=SETTINGS.request_timeout_s + 60)
    print(f"\nlauncher exited {time.monotonic() - stopped:.1f} s after SIGTERM, code {exit_code}")
    assert exit_code == 0
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
    assert time.monotonic() - stopped < 60
    lines = launched.log_text().splitlines()  # the log says it stopped, last, and when it began to
    assert any(line.startswith("stopping: ") for line in lines) and re.fullmatch(r"stopped \S+ in \d+\.\d s", lines[-1])
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{launched.http}/readyz", timeout=5)
