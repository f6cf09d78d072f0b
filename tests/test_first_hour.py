"""A new user's first hour: the README's commands as written, BentoML's own clients,
no 500 on any server's route, and the project's configuration without ``BENTOML_CONFIG``.

The servers are real: the launcher that ``make serve`` runs, on free ports, and a
``bentoml serve service:svc`` started from a copy of the project."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from client import request_inception_v3 as client
from inception_v3.settings import load_settings, read_settings, write_config_on_free_ports
from tests.conftest import CAT_JPEG, ROOT, TEST_CONFIG, linked_bentoml_home, split_address, start_launcher

pytestmark = pytest.mark.servers

README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
# README lines the tests cannot run here, and why.
NOT_RUN_HERE = {
    "downloaded by Keras": "no route to the ImageNet weights on these machines",
    "FILE.h5": "a placeholder for the user's weights file",
    "--int8-calibration DIR": "a placeholder for the user's images (test_engines.py saves int8 from generated ones)",
}


@dataclasses.dataclass
class Served:
    http: str
    grpc: str
    grpc_metrics: str
    runner: str | None  # None with an embedded runner (runner: auto on a CPU)
    config_file: Path


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server, then nothing it started may outlive it."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=60)
    for leftover in alive:
        leftover.kill()


def wait_until_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(1)


@pytest.fixture(scope="module")
def served(saved_model: str) -> Iterator[Served]:
    """``python -m inception_v3.launcher`` (what ``make serve`` runs) on free ports."""
    from inception_v3.launcher import wait_ready

    launch = start_launcher("first-hour")
    process, config, config_file, log = launch.process, launch.config, launch.config_file, launch.log
    http_port, grpc_port = config["api_server"]["http"]["port"], config["api_server"]["grpc"]["port"]
    settings = dataclasses.replace(load_settings(), http_port=http_port, grpc_port=grpc_port)
    try:
        deadline = time.monotonic() + 300
        while not wait_ready(settings, timeout_s=5):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        yield Served(
            http=f"127.0.0.1:{http_port}",
            grpc=f"127.0.0.1:{grpc_port}",
            grpc_metrics=f"127.0.0.1:{config['api_server']['grpc']['metrics']['port']}",
            runner=None
            if read_settings(config_file).embedded_runner
            else f"127.0.0.1:{config['services']['inception_v3']['runner_port']}",
            config_file=config_file,
        )
    finally:
        stop_tree(process)


# --- item 1: the README's commands, typed into a shell without an activated venv ---


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def shell_commands(markdown: str) -> list[str]:
    """Each command of the bash blocks, continuation lines joined."""
    commands = []
    for block in code_blocks(markdown, "bash"):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def fresh_shell_env(**extra: str) -> dict[str, str]:
    """A login shell's environment: the virtualenv neither activated nor on PATH."""
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if Path(p) != VENV_BIN]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(path), **extra}


def run_as_typed(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_readme_commands_need_no_activated_venv() -> None:
    """Every command the README shows starts with ``make``, ``curl``, ``.venv/bin/`` or (images) ``docker``."""
    for command in shell_commands(README.read_text()):
        words = [w for w in command.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # VAR=value prefixes
        assert words[0] in ("make", "curl", "docker") or words[0].startswith(".venv/bin/"), command


def test_readme_use_it_commands_work_as_typed(served: Served, tmp_path: Path) -> None:
    """The "Use it" section's shell commands and Python snippets against the served
    ports. The only changes from what a user types: the test server's ports (in URLs,
    and through ``BENTOML_CONFIG``, which the CLI client reads its defaults from)."""
    section = readme_section("Use it")
    ports = {":8501": f":{split_address(served.http)[1]}", ":8500": f":{split_address(served.grpc)[1]}"}

    def on_test_ports(text: str) -> str:
        for default, test_port in ports.items():
            text = text.replace(f"localhost{default}", f"localhost{test_port}")
        return text

    env = fresh_shell_env(BENTOML_CONFIG=str(served.config_file))
    commands = [on_test_ports(command) for command in shell_commands(section)]
    for number, snippet in enumerate(code_blocks(section, "python")):
        script = tmp_path / f"snippet_{number}.py"
        script.write_text(on_test_ports(snippet))
        commands.append(f".venv/bin/python {script}")
    assert len(commands) >= 8, commands
    for command in commands:
        result = run_as_typed(command, env)
        assert result.returncode == 0 and result.stdout.strip(), (command, result.stdout, result.stderr[-2000:])
        assert '"error"' not in result.stdout, (command, result.stdout)


def test_readme_model_commands_work_as_typed(tmp_path: Path) -> None:
    """ "The model" section, in a model store of its own (a new model there would change
    what ``inception_v3:latest`` means to the other tests)."""
    env = fresh_shell_env(BENTOML_HOME=str(tmp_path / "bentoml"))
    commands = [c for c in shell_commands(readme_section("The model")) if not any(s in c for s in NOT_RUN_HERE)]
    assert any("save_model.py" in c for c in commands) and any("models list" in c for c in commands), commands
    for command in commands:
        result = run_as_typed(command, env)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    assert "inception_v3" in result.stdout  # the models list shows the model just saved


# --- item 2: BentoML's own clients, as a user writes them ---


def test_bentoml_sync_http_client(served: Served, reference_classify: Callable[..., dict]) -> None:
    import bentoml

    expected = reference_classify(CAT_JPEG.read_bytes())
    images = [base64.b64encode(CAT_JPEG.read_bytes()).decode()] * 2
    with bentoml.SyncHTTPClient(f"http://{served.http}") as http_client:
        assert http_client.predict(str(CAT_JPEG))["label"] == expected["label"]
        assert http_client.predict(image=CAT_JPEG)["label"] == expected["label"]
        answer = http_client.predict_batch(images=images, top_k=2)
    assert [p["label"] for p in answer["predictions"]] == [expected["label"]] * 2
    assert all(len(p["top_k"]) == 2 for p in answer["predictions"])


def test_bentoml_async_http_client(served: Served, reference_classify: Callable[..., dict]) -> None:
    import bentoml

    expected = reference_classify(CAT_JPEG.read_bytes())["label"]

    async def ask() -> tuple[dict, dict, dict]:
        async with bentoml.AsyncHTTPClient(f"http://{served.http}") as http_client:
            return (
                await http_client.predict(image=str(CAT_JPEG)),
                await http_client.predict(CAT_JPEG),
                await http_client.predict_batch([base64.b64encode(CAT_JPEG.read_bytes()).decode()]),
            )

    by_str, by_path, batch = asyncio.run(ask())
    assert by_str["label"] == by_path["label"] == batch["predictions"][0]["label"] == expected


def test_bentoml_legacy_client_still_works(served: Served) -> None:
    from bentoml.client import Client
    from PIL import Image

    legacy = Client.from_url(f"http://{served.http}")
    with Image.open(CAT_JPEG) as image:
        # It sends the decoded pixels as PNG: the label of those pixels, not of the JPEG file.
        answer = legacy.predict(image)
    assert answer["label"] == answer["top_k"][0]["label"] and len(answer["top_k"]) == 5


# --- item 3: no route of any server answers 500; the gRPC server's metrics at /metrics ---


def test_grpc_server_metrics_at_the_metrics_path(served: Served) -> None:
    """The patch in ``inception_v3.grpc_metrics`` takes effect: BentoML's own server answers 500 here."""
    assert client.main(["-f", "grpc", "-t", "127.0.0.1", "--port", served.grpc.rpartition(":")[2]]) == 0
    response = httpx.get(f"http://{served.grpc_metrics}/metrics")
    assert response.status_code == 200, response.text
    assert 'inception_v3_requests_total{endpoint="/bentoml.grpc.v1.BentoService/Call"' in response.text
    assert httpx.get(f"http://{served.grpc_metrics}/").status_code == 200
    assert httpx.get(f"http://{served.grpc_metrics}/other").status_code == 404


def test_serve_grpc_metrics_at_the_metrics_path(grpc_address: str, cat_jpeg: bytes) -> None:
    """``bentoml serve-grpc`` starts its metrics server elsewhere in BentoML than the launcher does."""
    metrics_port = yaml.safe_load(TEST_CONFIG.read_text())["api_server"]["grpc"]["metrics"]["port"]
    client.classify_grpc(cat_jpeg, *split_address(grpc_address), timeout_s=30, top_k=None)  # metrics to show
    response = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert response.status_code == 200 and "bentoml_" in response.text, response.text
    statuses = {path: httpx.get(f"http://127.0.0.1:{metrics_port}{path}").status_code for path in PROBED_PATHS}
    assert max(statuses.values()) < 500, statuses


PROBED_PATHS = [
    "/",
    "/metrics",
    "/metrics/",
    "/docs.json",
    "/schema.json",
    "/livez",
    "/readyz",
    "/healthz",
    "/predict",
    "/predict_batch",
    "/v1",
    "/v1/models/inception_v3",
    "/v1/models/inception_v3:predict",
    "/v1/models/inception_v3/versions/x/metadata",
    "/static_content/missing.js",
    "/inception_v3",
    "/no/such/route",
    "/%ff",
]


def test_no_route_of_any_server_answers_500(served: Served) -> None:
    answers = {}
    for server in filter(None, (served.http, served.grpc_metrics, served.runner)):
        for path in PROBED_PATHS:
            for method in ("GET", "POST", "PUT", "DELETE", "HEAD"):
                answers[f"{method} {server}{path}"] = httpx.request(method, f"http://{server}{path}", timeout=30)
    server_errors = {request: r.status_code for request, r in answers.items() if r.status_code >= 500}
    assert not server_errors, server_errors


# --- item 7: --metadata over gRPC ---


def test_client_metadata_over_grpc(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    host, grpc_port = split_address(served.grpc)
    assert client.main(["--metadata", "-f", "grpc", "-t", host, "--port", str(grpc_port)]) == 0
    over_grpc = json.loads(capsys.readouterr().out)
    assert client.main(["--metadata", "-f", "rest", "-t", host, "--port", str(split_address(served.http)[1])]) == 0
    assert over_grpc == json.loads(capsys.readouterr().out)
    assert over_grpc["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["image"]


# --- item 4: `bentoml serve service:svc` without BENTOML_CONFIG ---


def test_bentoml_serve_uses_the_project_configuration_by_default(saved_model: str, tmp_path: Path) -> None:
    """From a copy of the project whose ``configuration.yaml`` names free ports (the
    real one names 8501, where a ``make serve`` may run): BentoML alone would serve on
    :3000 with a worker per core."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".*", "__pycache__", "bentoml_home", "build"))
    config = yaml.safe_load(write_config_on_free_ports(project / "configuration.yaml").read_text())
    http_port = config["api_server"]["http"]["port"]
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_CONFIG"}
    env["BENTOML_HOME"] = str(linked_bentoml_home("serve-default-config"))
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(VENV_BIN / "bentoml"), "serve", "service:svc"],
            cwd=project,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_ready(f"http://127.0.0.1:{http_port}/readyz", process, log)
        workers = [" ".join(p.cmdline()) for p in psutil.Process(process.pid).children(recursive=True)]
        api_workers = [w for w in workers if "bentoml_cli.worker.http_api_server" in w]
        assert len(api_workers) == config["api_server"]["workers"], workers
    finally:
        stop_tree(process)
