"""``make serve``'s launcher: HTTP and gRPC from one runner process, and a stop
that leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from client import request_inception_v3 as client
from inception_v3.launcher import wait_ready
from inception_v3.settings import read_settings, write_config_on_free_ports
from tests.conftest import ROOT

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def launcher(saved_model: str, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("launcher")
    config = write_config_on_free_ports(folder / "configuration.yaml")
    env = {**os.environ, "BENTOML_CONFIG": str(config)}
    log = folder / "serve.log"
    with log.open("wb") as output:
        command = [sys.executable, "-m", "inception_v3.launcher"]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    settings = read_settings(config)
    try:
        assert wait_ready(settings, timeout_s=240), f"launcher not ready:\n{log.read_text()[-3000:]}"
        yield process, settings, log
    finally:
        if process.poll() is None:
            process.kill()
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()


def test_both_protocols_answer_from_one_runner(launcher, cat_jpeg, reference_classify):
    process, settings, _ = launcher
    expected = reference_classify(cat_jpeg)["label"]
    assert client.classify_rest(cat_jpeg, "127.0.0.1", settings.http_port, 30, None)["label"] == expected
    assert client.classify_grpc(cat_jpeg, "127.0.0.1", settings.grpc_port, 30, None)["label"] == expected
    workers = [" ".join(p.cmdline()) for p in psutil.Process(process.pid).children(recursive=True)]
    assert sum("bentoml_cli.worker.runner" in w for w in workers) == 1, workers
    assert sum("bentoml_cli.worker.http_api_server" in w for w in workers) == 1, workers
    assert sum("bentoml_cli.worker.grpc_api_server" in w for w in workers) == 1, workers


def test_the_runner_logs_where_the_model_runs(launcher):
    *_, log = launcher
    pattern = r"inception_v3:\w+ loaded in [0-9.]+ s, warmed up in [0-9.]+ s, on (the CPU|/device:GPU:[0-9])"
    assert re.search(pattern, log.read_text()), log.read_text()[-3000:]


def test_sigterm_stops_everything(launcher):
    process, *_ = launcher
    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"
    assert time.monotonic() - started < 60
