"""The container image, built from scratch and run for real (slow, opt-in).

    RUN_IMAGE_TESTS=1 pytest -m image tests/test_image.py -s      # or: make image-test

``bentoml build`` of the working tree with the test store's random-weights model, then
``bentoml containerize inception_v3:latest`` as a user types it, from the project
folder, under a tag of its own (docker; or buildah, with the options of
``container.image.containerize_options``: its cached Debian base as a build argument),
then the image's default command with the test configuration (free ports) mounted over
its own. The project's client asks over both protocols. Prints the command, the image
size, build time, cold start and memory; removes the image after.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from container import image
from tests.conftest import CAT_JPEG, ROOT, TEST_CONFIG, WORK_DIR, Classify

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("RUN_IMAGE_TESTS") != "1", reason="builds an image: set RUN_IMAGE_TESTS=1"),
    pytest.mark.timeout(1800),
]

RUN_ID = uuid.uuid4().hex[:8]
TAG = f"inception_v3:image-test-{RUN_ID}"
STATE_FILE = WORK_DIR / "container.json"


def python(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_CONFIG": str(TEST_CONFIG)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, text=True, **kwargs)  # type: ignore[call-overload]


def configured_port(*keys: str) -> int:
    section = yaml.safe_load(TEST_CONFIG.read_text())["api_server"]
    for key in keys:
        section = section[key]
    return int(section)


@pytest.fixture(scope="module")
def backend() -> str:
    return image.detect_backend()


@pytest.fixture(scope="module")
def built_image(saved_model: str, backend: str) -> Iterator[str]:
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    started = time.monotonic()
    subprocess.run([bentoml_cli, "build"], cwd=ROOT, check=True)
    bento_s = time.monotonic() - started
    if backend == "buildah":
        image.build_base(backend)
    containerize = ["containerize", "inception_v3:latest", "--image-tag", TAG, *image.containerize_options(backend)]
    print(f"\nbento built in {bento_s:.0f} s; from {ROOT}: bentoml {shlex.join(containerize)}")
    started = time.monotonic()
    subprocess.run([bentoml_cli, *containerize], cwd=ROOT, env=image.backend_env(backend), check=True)
    print(f"image {TAG} ({backend}) built in {time.monotonic() - started:.0f} s")
    print(f"image size: {image.image_size(TAG, backend)}")
    yield TAG
    image.remove([TAG], backend)


@pytest.fixture(scope="module")
def container(built_image: str) -> Iterator[image.Container]:
    started = time.monotonic()
    running = image.run(built_image, f"inception-v3-test-{RUN_ID}", TEST_CONFIG, STATE_FILE)
    ready = python("-m", "inception_v3.launcher", "--wait-ready", "--timeout", "300")
    if ready.returncode != 0:
        image.stop(STATE_FILE)
        pytest.fail(f"the container did not become ready; its log: {running.log}")
    print(f"\ncold start to ready (HTTP /readyz and gRPC health): {time.monotonic() - started:.0f} s")
    yield running
    image.stop(STATE_FILE)


def test_bento_and_image_contain_the_model(container: image.Container, saved_model: str) -> None:
    import bentoml

    assert [str(model.tag) for model in bentoml.get("inception_v3:latest").info.models] == [saved_model]
    name, version = saved_model.split(":")
    listing = image.execute(container, ["ls", f"/home/bentoml/bento/models/{name}"])
    assert version in listing.stdout.split(), listing.stderr


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_gets_answers_from_the_image(
    container: image.Container, protocol: str, reference_classify: Classify
) -> None:
    port = configured_port("grpc", "port") if protocol == "grpc" else configured_port("http", "port")
    answer = python(
        "-m", "client.request_inception_v3", "-f", protocol, "-i", str(CAT_JPEG), "-t", "127.0.0.1",
        "--port", str(port), "-s", "30", capture_output=True, check=True,
    )  # fmt: skip
    assert answer.stdout.strip() == reference_classify(CAT_JPEG.read_bytes())["label"]


def test_image_carries_no_tensorflow(container: image.Container) -> None:
    """The CPU image serves with OpenVINO; TF Serving's doors use the project's copies of its protos."""
    probe = "from inception_v3 import engines; print(engines.installed())"
    result = image.execute(container, ["python", "-c", probe])
    assert result.stdout.strip() == "('openvino',)", result.stderr
    assert image.execute(container, ["python", "-c", "import tensorflow.python"]).returncode != 0


def test_serves_from_one_runner_as_non_root(container: image.Container, backend: str) -> None:
    assert image.image_config(container.image, backend)["User"] == "bentoml"
    launcher = image.main_process(container)
    assert launcher is not None
    processes = [launcher, *launcher.children(recursive=True)]
    assert all(p.uids().effective != 0 for p in processes)
    commands = [" ".join(p.cmdline()) for p in processes]
    assert sum("bentoml_cli.worker.runner" in c for c in commands) == 1
    memory = [p.memory_full_info() for p in processes]
    gib = 2**30
    pss, rss, uss = (sum(getattr(m, field) for m in memory) / gib for field in ("pss", "rss", "uss"))
    print(f"\n{len(processes)} processes: PSS {pss:.2f} GiB, RSS {rss:.2f} GiB, USS {uss:.2f} GiB")
    for process, usage in zip(processes, memory, strict=True):
        print(f"  {usage.pss / 2**20:6.0f} MiB PSS  {' '.join(process.cmdline()[:4])[:100]}")
    assert pss < 2.5


def test_health_check_passes(container: image.Container, backend: str) -> None:
    test = image.image_config(container.image, backend)["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    result = image.execute(container, test[1:])
    assert result.returncode == 0, result.stderr


def test_stop_leaves_no_process(container: image.Container) -> None:
    launcher = image.main_process(container)
    assert launcher is not None
    processes = [launcher, *launcher.children(recursive=True)]
    started = time.monotonic()
    image.stop(STATE_FILE)
    print(f"\nstopped in {time.monotonic() - started:.1f} s")
    _gone, alive = psutil.wait_procs(processes, timeout=5)
    assert alive == []
    assert not STATE_FILE.exists()


def test_a_mounted_model_store_serves_its_new_versions(built_image: str, saved_model: str) -> None:
    """``make run MODEL_STORE=...``: the container serves the mounted store's versions and picks up a new one."""
    import httpx

    from benchmarks.model_copies import add_version, copy_model
    from tests.conftest import SHARED_BENTOML_HOME

    store = WORK_DIR / "image-model-store" / "models"
    tag = copy_model(SHARED_BENTOML_HOME / "models", saved_model, store)
    state_file = WORK_DIR / "container-model-store.json"
    running = image.run(built_image, f"inception-v3-store-{RUN_ID}", TEST_CONFIG, state_file, model_store=store)
    try:
        ready = python("-m", "inception_v3.launcher", "--wait-ready", "--timeout", "300")
        assert ready.returncode == 0, f"the container did not become ready; its log: {running.log}"
        url = f"http://127.0.0.1:{configured_port('http', 'port')}/predict"

        def version() -> int:
            answer = httpx.post(url, content=CAT_JPEG.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()["version"]

        first = version()
        add_version(store, tag, first + 1)
        image.reload(state_file)
        deadline = time.monotonic() + 30
        while version() != first + 1:
            assert time.monotonic() < deadline, f"the new version did not answer; log: {running.log}"
            time.sleep(0.5)
    finally:
        image.stop(state_file)
