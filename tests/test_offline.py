"""Without the ImageNet download: ``make serve`` still serves, and says loudly that it
serves random weights; ``WEIGHTS=imagenet`` fails in one line; the image build
refuses random weights unless asked. The answers and metadata of a random-weights
model (the suite's own) carry the warning on every door.

The download is blocked here, not by the machine: a fresh Keras cache and model
store, and an HTTPS proxy that accepts connections and never answers (or nothing
listening), with only the loopback exempt.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import bentoml
import grpc
import httpx
import numpy as np
import psutil
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from client import request_inception_v3 as client
from container import image
from inception_v3.settings import write_config_on_free_ports
from inception_v3.weights import RANDOM_WARNING, REAL_WEIGHTS_COMMAND, has_weights, kind, warning
from tests.conftest import CAT_JPEG, ROOT, WORK_DIR, split_address

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there


@contextlib.contextmanager
def silent_proxy() -> Iterator[str]:
    """A proxy that takes connections and never answers: without a timeout the download would hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # never accepted: the kernel completes the handshakes, nobody reads
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def offline_env(name: str, proxy: str) -> dict[str, str]:
    """A fresh model store, Keras cache and configuration (free ports); the download goes to ``proxy``."""
    home = WORK_DIR / name
    home.mkdir()
    return {
        **os.environ,
        **{key: proxy for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")},
        **{key: "127.0.0.1,localhost" for key in ("no_proxy", "NO_PROXY")},
        "BENTOML_HOME": str(home / "bentoml"),
        "KERAS_HOME": str(home / "keras"),
        "BENTOML_CONFIG": str(write_config_on_free_ports(home / "configuration.yaml")),
    }


def run_dir(env: dict[str, str]) -> Path:
    """Where make serve keeps its pid and log: beside the fresh store, not the project's .run/."""
    return Path(env["BENTOML_HOME"]).parent / "run"


def make(target: str, env: dict[str, str], *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    command = ["make", "--no-print-directory", target, f"RUN_DIR={run_dir(env)}", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def latest_model_metadata(env: dict[str, str]) -> dict:
    shown = subprocess.run(
        [Path(sys.executable).with_name("bentoml"), "models", "get", "inception_v3:latest", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(shown.stdout)["metadata"]


def stop_launcher(pid_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError, psutil.NoSuchProcess):
        launcher = psutil.Process(int(pid_file.read_text()))
        tree = [launcher, *launcher.children(recursive=True)]
        launcher.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=60)
        for leftover in alive:
            leftover.kill()


# --- make serve and save_model.py without the download ------------------------------------


@pytest.mark.servers
@pytest.mark.timeout(600)
def test_make_serve_offline_serves_random_weights_and_says_so() -> None:
    with silent_proxy() as proxy:
        env = offline_env("make-serve-offline", proxy)
        started = time.monotonic()
        try:
            served = make("serve", env)
            elapsed = time.monotonic() - started
            output = served.stdout + served.stderr
            assert served.returncode == 0, output[-3000:]
            assert "could not download the ImageNet weights (timed out): saving random weights instead" in output
            assert latest_model_metadata(env)["weights"] == "random"
            notice = served.stdout[served.stdout.index("=" * 78) :]
            assert "RANDOM WEIGHTS" in notice and "meaningless" in notice and "(timed out)" in notice
            assert f"    {REAL_WEIGHTS_COMMAND}\n" in notice
            assert served.stdout.rstrip().endswith("=" * 78), "the notice ends make serve's output"
            assert RANDOM_WARNING in (run_dir(env) / "serve.log").read_text(), "the runner's start-up log warns"
            print(f"\nmake serve, fresh store, download unanswered: ready in {elapsed:.0f} s")
        finally:
            stop_launcher(run_dir(env) / "serve.pid")


def test_weights_imagenet_fails_in_one_line_without_tensorflow_noise() -> None:
    env = offline_env("strict-imagenet", DEAD_PROXY)
    failed = make("model", env, "WEIGHTS=imagenet", timeout_s=300)
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(lines) == 1, failed.stderr
    (error,) = lines
    assert error.startswith("error: could not download the ImageNet weights ([Errno 111] Connection refused)")
    assert REAL_WEIGHTS_COMMAND in error and "make serve WEIGHTS=random" in error
    assert failed.stdout.splitlines() == [
        "Downloading data from https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
        "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
    ]
    assert not (Path(env["BENTOML_HOME"]) / "models" / "inception_v3").exists()


def test_a_weights_file_keras_cannot_load_fails_in_one_line(tmp_path: Path) -> None:
    not_hdf5 = tmp_path / "inception_v3.h5"
    not_hdf5.write_bytes(b"<html>a download that went wrong</html>")
    env = offline_env("bad-weights-file", DEAD_PROXY)
    failed = make("model", env, f"WEIGHTS={not_hdf5}", timeout_s=300)
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    reason = "Unable to synchronously open file (file signature not found)"  # h5py's
    assert lines == [f"error: {not_hdf5} is not Keras Inception v3 weights: {reason}"]
    assert not (Path(env["BENTOML_HOME"]) / "models" / "inception_v3").exists()


@pytest.mark.timeout(600)
def test_the_notices_command_replaces_a_random_model_with_the_file(tmp_path: Path) -> None:
    """What the notice tells a user to type saves the file's weights over the random model, once."""
    weights_file = tmp_path / "inception_v3.weights.h5"
    tf.keras.applications.InceptionV3(weights=None).save_weights(weights_file)
    env = offline_env("weights-file", DEAD_PROXY)
    assert make("model", env).returncode == 0
    assert latest_model_metadata(env)["weights"] == "random"
    assert make("model", env, f"WEIGHTS={weights_file}").returncode == 0
    metadata = latest_model_metadata(env)
    assert (metadata["weights"], metadata["weights_file"]) == ("file", str(weights_file))
    again = make("model", env, f"WEIGHTS={weights_file}")
    assert again.stdout.startswith("model: inception_v3:") and "Downloading" not in again.stdout


@pytest.mark.parametrize(
    ("metadata", "requested", "expected"),
    [
        ({"weights": "random"}, "auto", True),
        ({"weights": "random"}, "imagenet", False),
        ({"weights": "random"}, "random", True),
        ({"weights": "imagenet"}, "random", False),
        ({"weights": "file", "weights_file": "/w/a.h5"}, "/w/a.h5", True),
        ({"weights": "file", "weights_file": "/w/a.h5"}, "/w/b.h5", False),
        ({"weights": "random (seed 7)"}, "random", True),  # saved before the kinds were recorded
    ],
)
def test_make_serve_saves_a_model_when_weights_name_others(metadata: dict, requested: str, expected: bool) -> None:
    assert has_weights(metadata, requested) is expected


def test_only_random_weights_warn() -> None:
    assert warning({"weights": "random"}) == RANDOM_WARNING
    assert warning({"weights": "imagenet"}) is warning({"weights": "file"}) is None
    assert kind({"weights": "imagenet (Keras download)"}) == "imagenet"


# --- the image build ----------------------------------------------------------------------


def test_image_build_refuses_random_weights_unless_asked(
    saved_model: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check, not a build: the Bento is a stand-in that holds the suite's random model."""
    bento = SimpleNamespace(info=SimpleNamespace(all_models=[SimpleNamespace(tag=saved_model)]))
    monkeypatch.setattr(bentoml, "get", lambda tag: bento)
    built: list[str] = []
    monkeypatch.setattr(image, "build", lambda tag, *args, **kwargs: built.append(tag))
    monkeypatch.setenv("CONTAINER_BACKEND", "docker")
    with pytest.raises(SystemExit) as refused:
        image.main(["build", "--bento", "inception_v3:offline"])
    message = str(refused.value)
    assert message.startswith("error: inception_v3:offline holds inception_v3:") and "\n" not in message
    assert "make build_all WEIGHTS=random" in message and "random weights" in message
    assert built == []
    assert image.main(["build", "--bento", "inception_v3:offline", "--allow-random-weights"]) == 0
    assert built == ["inception_v3:offline"]


# --- what the servers say about a random-weights model (the suite's own) ------------------


@pytest.mark.servers
def test_bentoml_answers_carry_the_warning(http_address: str, cat_jpeg: bytes) -> None:
    predicted = httpx.post(f"http://{http_address}/predict", content=cat_jpeg, headers={"Content-Type": "image/jpeg"})
    assert predicted.json()["warning"] == RANDOM_WARNING
    body = {"images": [base64.b64encode(cat_jpeg).decode()] * 2}
    batch = httpx.post(f"http://{http_address}/predict_batch", json=body, timeout=30).json()
    assert [p["warning"] for p in batch["predictions"]] == [RANDOM_WARNING] * 2


@pytest.mark.servers
def test_bentoml_grpc_answer_carries_the_warning(grpc_address: str, cat_jpeg: bytes) -> None:
    from bentoml.grpc.v1 import service_pb2, service_pb2_grpc
    from google.protobuf import json_format

    with grpc.insecure_channel(grpc_address) as channel:
        request = service_pb2.Request(api_name="predict", file=service_pb2.File(kind="image/jpeg", content=cat_jpeg))
        response = service_pb2_grpc.BentoServiceStub(channel).Call(request, timeout=30)
    assert json_format.MessageToDict(response.json)["warning"] == RANDOM_WARNING


@pytest.mark.servers
def test_client_cli_warns_beside_the_label(
    http_address: str, grpc_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for fmt, address in (("rest", http_address), ("grpc", grpc_address)):
        host, port = split_address(address)
        assert client.main(["-f", fmt, "-i", str(CAT_JPEG), "-t", host, "--port", str(port)]) == 0
        printed = capsys.readouterr()
        assert printed.err == f"warning: {RANDOM_WARNING}\n" and len(printed.out.splitlines()) == 1


@pytest.mark.servers
def test_readyz_says_ready_with_random_weights(http_address: str) -> None:
    ready = httpx.get(f"http://{http_address}/readyz")
    assert ready.status_code == 200 and ready.text == f"ready; {RANDOM_WARNING}\n"


@pytest.mark.servers
def test_tf_serving_rest_names_the_weights_and_warns(http_address: str, cat_jpeg: bytes) -> None:
    rest = f"http://{http_address}/v1/models/inception_v3"
    assert httpx.get(f"{rest}/metadata").json()["metadata"]["weights"] == "random"
    body = {"inputs": {"image": [base64.urlsafe_b64encode(cat_jpeg).decode()]}}
    predicted = httpx.post(f"{rest}:predict", json=body, timeout=30)
    assert predicted.headers["x-model-warning"] == RANDOM_WARNING and len(predicted.json()["outputs"]) == 1


@pytest.mark.servers
def test_tf_serving_grpc_names_the_weights_and_warns(grpc_address: str, cat_jpeg: bytes) -> None:
    from google.protobuf import wrappers_pb2

    with grpc.insecure_channel(grpc_address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        asked = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        asked.model_spec.name = "inception_v3"
        metadata = stub.GetModelMetadata(asked, timeout=30)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "inception_v3"
        request.inputs["image"].CopyFrom(tf.make_tensor_proto([cat_jpeg]))
        _, call = stub.Predict.with_call(request, metadata=[("x-request-id", "offline-tfs")], timeout=30)
    weights = wrappers_pb2.StringValue()
    assert metadata.metadata["weights"].Unpack(weights) and weights.value == "random"
    answered = dict(call.trailing_metadata())  # the warning beside the request id, not instead of it
    assert answered["x-model-warning"] == RANDOM_WARNING and answered["x-request-id"] == "offline-tfs"


@pytest.mark.servers
def test_open_inference_answers_carry_the_warning(http_address: str, grpc_address: str, cat_jpeg: bytes) -> None:
    import tritonclient.grpc
    import tritonclient.http

    def image(module: t.Any) -> t.Any:
        tensor = module.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([cat_jpeg], dtype=object))
        return tensor

    with tritonclient.http.InferenceServerClient(http_address) as triton:
        rest = triton.infer("inception_v3", [image(tritonclient.http)]).get_response()
    with tritonclient.grpc.InferenceServerClient(grpc_address) as triton:
        grpc_answer = triton.infer("inception_v3", [image(tritonclient.grpc)]).get_response()
    assert rest["parameters"]["warning"] == RANDOM_WARNING
    assert grpc_answer.parameters["warning"].string_param == RANDOM_WARNING
