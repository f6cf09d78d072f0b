"""The launcher's plan (``inception_v3.workers``): BentoML's workers, with what its supervisors would give them."""

from __future__ import annotations

import json
import os

import pytest

from inception_v3 import workers
from inception_v3.settings import read_settings, write_config_on_free_ports
from tests.conftest import ROOT


def test_the_plan_gives_each_worker_what_bentomls_supervisors_would(saved_model: str, tmp_path) -> None:
    import service

    config_file = write_config_on_free_ports(
        tmp_path / "configuration.yaml", {"api_server.workers": 2, "services.inception_v3.runner": "shared"}
    )
    env = {**os.environ, "BENTOML_CONFIG": str(config_file)}
    planned = workers.planned("service:svc", ROOT, env)

    assert [(w.kind, w.index) for w in planned] == [
        ("runner", 1),
        ("http", 1),
        ("grpc", 1),
        ("http", 2),
        ("grpc", 2),
        ("grpc-metrics", 1),
    ]
    runner = planned[0].command
    env_map = json.loads(runner[runner.index("--worker-env-map") + 1])
    # The service's own runner, as start-runner-server reads it (scheduled by BentoML's strategy).
    assert env_map == {
        str(i): {k: str(v) for k, v in e.items()} for i, e in service.runner.scheduled_worker_env_map.items()
    }
    for worker in planned:
        assert (workers.FD in worker.command) is (worker.listens is not None), worker
        assert worker.env["PROMETHEUS_MULTIPROC_DIR"]
    assert [w.command[w.command.index("--worker-id") + 1] for w in planned if w.kind == "http"] == ["1", "2"]
    shared = {w.listens for w in planned if w.kind == "http"}
    assert len(shared) == 1, "HTTP workers share one socket"
    assert [w.kind for w in planned if w.holds_model] == ["runner"]


def test_with_an_embedded_runner_the_api_workers_hold_the_model_and_no_runner_starts(
    saved_model: str, tmp_path
) -> None:
    config_file = write_config_on_free_ports(
        tmp_path / "configuration.yaml", {"services.inception_v3.runner": "embedded"}
    )
    planned = workers.planned("service:svc", ROOT, {**os.environ, "BENTOML_CONFIG": str(config_file)})
    assert [(w.kind, w.holds_model) for w in planned] == [("http", True), ("grpc", True), ("grpc-metrics", False)]


def test_a_runner_mode_that_does_not_exist_is_named(tmp_path) -> None:
    config_file = write_config_on_free_ports(tmp_path / "configuration.yaml", {"services.inception_v3.runner": "local"})
    with pytest.raises(ValueError, match="runner is 'local': it must be one of auto, shared, embedded"):
        read_settings(config_file)


@pytest.mark.parametrize(
    ("engine", "runner", "embedded"),
    [("auto", "auto", True), ("openvino", "auto", True), ("tensorflow", "auto", False), ("auto", "shared", False)],
)
def test_runner_auto_embeds_the_openvino_engine_and_shares_tensorflow(
    tmp_path, monkeypatch, engine: str, runner: str, embedded: bool
) -> None:
    """``auto`` follows the engine this host runs (no GPU here: auto is OpenVINO); ``INCEPTION_V3_RUNNER`` wins."""
    overrides = {"services.inception_v3.engine": engine, "services.inception_v3.runner": "embedded"}
    config_file = write_config_on_free_ports(tmp_path / "configuration.yaml", overrides)
    monkeypatch.setenv("INCEPTION_V3_RUNNER", runner)
    assert read_settings(config_file).embedded_runner is embedded


@pytest.mark.parametrize("value", ["half", -1, 2.5, True])
def test_an_openvino_batch_limit_that_is_not_a_count_is_named(tmp_path, value) -> None:
    config_file = write_config_on_free_ports(
        tmp_path / "configuration.yaml", {"services.inception_v3.openvino_batch_limit": value}
    )
    with pytest.raises(ValueError, match=r"openvino_batch_limit is .*: it must be auto or a count"):
        read_settings(config_file)
