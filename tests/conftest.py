"""Shared fixtures: an isolated model store with a random-weights model, the
in-process reference model, and real BentoML servers (HTTP and gRPC) on free ports.

The model store and the configuration are set in the environment before BentoML
reads them, so the suite never touches ``~/bentoml`` or the ports of a running
``make serve``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from inception_v3.settings import write_config_on_free_ports

ROOT = Path(__file__).resolve().parent.parent
CAT_JPEG = ROOT / "cat.jpg"
WORK_DIR = Path(tempfile.mkdtemp(prefix="inception-v3-tests-"))
TEST_CONFIG = WORK_DIR / "configuration.yaml"


write_config_on_free_ports(TEST_CONFIG)
SHARED_BENTOML_HOME = WORK_DIR / "bentoml"
os.environ["BENTOML_HOME"] = str(SHARED_BENTOML_HOME)
os.environ["BENTOML_CONFIG"] = str(TEST_CONFIG)
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
sys.path.insert(0, str(ROOT))

Classify = Callable[[bytes], dict]
running_test: list[pytest.Item] = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    running_test[:] = [item]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run's model stores, Bentos and server logs (2.4 GB for the whole suite) go once it
    passes: 14 runs had left 34 GB on one machine. A failed run keeps them, for the logs."""
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        shutil.rmtree(WORK_DIR, ignore_errors=True)
    else:
        print(f"\nthis run's model stores, Bentos and server logs are kept in {WORK_DIR}")


def require_servers_mark() -> None:
    """``pytest -m "not servers"`` is the README's fast run: a test that starts servers must say so."""
    if running_test and running_test[0].get_closest_marker("servers") is None:
        pytest.fail(f"{running_test[0].nodeid} starts servers: mark it @pytest.mark.servers")


@pytest.fixture(scope="session")
def cat_jpeg() -> bytes:
    return CAT_JPEG.read_bytes()


@pytest.fixture(scope="session")
def saved_model() -> str:
    """A random-weights Inception v3 in the test store (no download on these machines)."""
    import bentoml

    import save_model

    assert save_model.main(["--random-weights", "--seed", "7"]) == 0
    return str(bentoml.models.get("inception_v3:latest").tag)


@pytest.fixture(scope="session")
def reference_classify(saved_model: str) -> Classify:
    """The in-process answer: the service's own preprocessing and runnable (same engine and precision), no server."""
    import bentoml
    import numpy as np

    from inception_v3.api import to_prediction
    from inception_v3.preprocessing import prepare_image
    from inception_v3.runner import InceptionV3Runnable, runnable_init_params
    from inception_v3.settings import load_settings
    from inception_v3.versions import requested

    bento_model = bentoml.models.get(saved_model)
    runnable = InceptionV3Runnable(**runnable_init_params(bento_model, load_settings()))
    class_names = bento_model.custom_objects["class_names"]

    def classify(image: bytes, k: int = 5) -> dict:
        (probabilities,), (version,) = runnable.classify(np.stack([prepare_image(image)]), requested(1))
        return to_prediction(probabilities, class_names, k, int(version)).model_dump()

    return classify


@pytest.fixture(scope="session")
def servers_context() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def linked_bentoml_home(name: str) -> Path:
    """A BENTOML_HOME of its own for a server, linked to the shared model and Bento stores.

    BentoML keeps Prometheus' multiprocess files in $BENTOML_HOME/prometheus_multiproc_dir
    and empties that folder whenever a server starts, so a second server would erase
    the metrics of the first.
    """
    home = WORK_DIR / name
    home.mkdir(exist_ok=True)
    for store in ("models", "bentos"):
        if not (home / store).exists():
            (home / store).symlink_to(SHARED_BENTOML_HOME / store)
    return home


@contextlib.contextmanager
def own_bentoml_home(name: str) -> Iterator[None]:
    """``BENTOML_HOME`` is ``linked_bentoml_home(name)`` while a server starts."""
    os.environ["BENTOML_HOME"] = str(linked_bentoml_home(name))
    try:
        yield
    finally:
        os.environ["BENTOML_HOME"] = str(SHARED_BENTOML_HOME)


@dataclasses.dataclass
class Launch:
    """A ``python -m inception_v3.launcher`` (what ``make serve`` runs) started by ``start_launcher``."""

    process: subprocess.Popen[bytes]
    config: dict[str, t.Any]
    config_file: Path
    env: dict[str, str]
    log: Path

    def address(self, *keys: str) -> str:
        node = self.config
        for key in keys:
            node = node[key]
        return f"127.0.0.1:{node['port']}"


def start_launcher(name: str, overrides: dict[str, t.Any] | None = None, env: dict[str, str] | None = None) -> Launch:
    """The launcher on free ports and loopback only, in a BentoML home of its own linked to the test stores."""
    require_servers_mark()
    home = linked_bentoml_home(name)
    config_file = write_config_on_free_ports(
        home / "configuration.yaml",
        {
            "api_server.http.host": "127.0.0.1",
            "api_server.grpc.host": "127.0.0.1",
            "api_server.grpc.metrics.host": "127.0.0.1",
            **(overrides or {}),
        },
    )
    environment = {
        **os.environ,
        **(env or {}),
        "BENTOML_HOME": str(home),
        "BENTOML_CONFIG": str(config_file),
        "PYTHONUNBUFFERED": "1",
    }
    log = home / "launcher.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "inception_v3.launcher"],
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return Launch(process, yaml.safe_load(config_file.read_text()), config_file, environment, log)


def hosted_bento(stack: contextlib.ExitStack, use_grpc: bool, config_file: Path = TEST_CONFIG, name: str = "") -> str:
    from bentoml.testing.server import host_bento

    require_servers_mark()
    with own_bentoml_home(name or ("grpc-server" if use_grpc else "http-server")):
        return stack.enter_context(
            host_bento(
                project_path=str(ROOT),
                config_file=str(config_file),
                use_grpc=use_grpc,
                clean_context=stack,
                timeout=240,
            )
        )


@pytest.fixture(scope="session")
def http_address(saved_model: str, servers_context: contextlib.ExitStack) -> str:
    """``bentoml serve`` of the built Bento, as a real subprocess: "127.0.0.1:PORT"."""
    return hosted_bento(servers_context, use_grpc=False)


@pytest.fixture(scope="session")
def grpc_address(saved_model: str, servers_context: contextlib.ExitStack) -> str:
    """``bentoml serve-grpc`` of the built Bento, as a real subprocess: "127.0.0.1:PORT"."""
    return hosted_bento(servers_context, use_grpc=True)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
