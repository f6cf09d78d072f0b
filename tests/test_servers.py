"""Real ``bentoml serve`` and ``bentoml serve-grpc`` processes, queried with the
project's client: the served answer equals the in-process model's answer."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest

from client import request_inception_v3 as client
from inception_v3.settings import write_config_on_free_ports
from tests.conftest import CAT_JPEG, WORK_DIR, hosted_bento, split_address
from tests.expectations import assert_same_prediction

pytestmark = pytest.mark.servers


def test_http_predict_equals_in_process(http_address, cat_jpeg, reference_classify):
    host, port = split_address(http_address)
    served = client.classify_rest(cat_jpeg, host, port, timeout_s=30, top_k=None)
    assert len(served["top_k"]) == 5
    assert_same_prediction(served, reference_classify(cat_jpeg))


def test_grpc_predict_equals_in_process(grpc_address, cat_jpeg, reference_classify):
    host, port = split_address(grpc_address)
    served = client.classify_grpc(cat_jpeg, host, port, timeout_s=30, top_k=3)
    assert_same_prediction(served, reference_classify(cat_jpeg, k=3))


def test_http_top_k_query(http_address, cat_jpeg):
    response = httpx.post(
        f"http://{http_address}/predict?top_k=12", content=cat_jpeg, headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 200
    assert len(response.json()["top_k"]) == 12


def test_predict_batch_api(http_address, cat_jpeg, reference_classify):
    import base64

    images = [base64.b64encode(cat_jpeg).decode(), base64.urlsafe_b64encode(cat_jpeg).decode()]
    response = httpx.post(f"http://{http_address}/predict_batch", json={"images": images, "top_k": 2}, timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == [reference_classify(cat_jpeg)["label"]] * 2
    assert all(len(p["top_k"]) == 2 for p in predictions)


def test_concurrent_requests_are_batched(http_address, cat_jpeg):
    def predict(_: int) -> int:
        return httpx.post(
            f"http://{http_address}/predict", content=cat_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(predict, range(48))) == {200}
    metrics = httpx.get(f"http://{http_address}/metrics").text
    batches = batch_size_histogram(metrics)
    assert batches["images"] >= 48
    # Fewer runner calls than images: batches held more than one image on average.
    assert batches["count"] < batches["images"], batches


def batch_size_histogram(metrics: str) -> dict[str, float]:
    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern + r"\} ([0-9.e+]+)", metrics))

    prefix = r"bentoml_runner_adaptive_batch_size"
    return {"count": total(prefix + r"_count\{[^}]*"), "images": total(prefix + r"_sum\{[^}]*")}


def test_client_cli_prints_label(http_address, grpc_address, reference_classify, capsys):
    expected = reference_classify(CAT_JPEG.read_bytes())["label"]
    for fmt, address in (("rest", http_address), ("grpc", grpc_address)):
        host, port = split_address(address)
        assert client.main(["-f", fmt, "-i", str(CAT_JPEG), "-t", host, "--port", str(port)]) == 0
        assert capsys.readouterr().out.strip() == expected


def test_client_cli_errors_are_one_line(http_address, tmp_path, capsys):
    host, port = split_address(http_address)
    assert client.main(["-f", "rest", "-i", str(tmp_path / "missing.jpg"), "-t", host, "--port", str(port)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    for fmt in ("rest", "grpc"):
        assert client.main(["-f", fmt, "-t", "127.0.0.1", "--port", "9", "-s", "2"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("top_k", ["0", "1001", "-3", "abc"])
def test_client_cli_refuses_a_top_k_the_server_would(top_k, capsys):
    with pytest.raises(SystemExit) as exited:
        client.main(["--top_k", top_k])
    assert exited.value.code == 2
    assert f"expected a whole number from 1 to 1000, got '{top_k}'" in capsys.readouterr().err


def test_grpc_reflection_lists_every_service(grpc_address):
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(grpc_address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "bentoml.grpc.v1.BentoService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "grpc.health.v1.Health",
    } <= services


def test_tensorflow_engine_serves_end_to_end(saved_model, servers_context, cat_jpeg):
    """``engine: tensorflow`` (what NVIDIA GPUs run) on a real server, against the same engine in process."""
    import bentoml
    import numpy as np

    from inception_v3.api import to_prediction
    from inception_v3.preprocessing import prepare_image
    from inception_v3.runner import InceptionV3Runnable
    from inception_v3.versions import requested

    config = write_config_on_free_ports(
        WORK_DIR / "configuration-tensorflow.yaml", {"services.inception_v3.engine": "tensorflow"}
    )
    address = hosted_bento(servers_context, use_grpc=False, config_file=config, name="tensorflow-server")
    bento_model = bentoml.models.get(saved_model)
    runnable = InceptionV3Runnable(bento_model, "tensorflow", "auto", ())
    (probabilities,), (version,) = runnable.classify(np.stack([prepare_image(cat_jpeg)]), requested(1))
    expected = to_prediction(probabilities, bento_model.custom_objects["class_names"], 5, int(version)).model_dump()
    assert (runnable.engine.name, runnable.engine.precision) == ("tensorflow", "fp32")
    served = client.classify_rest(cat_jpeg, *split_address(address), timeout_s=30, top_k=None)
    assert_same_prediction(served, expected)
