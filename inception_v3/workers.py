"""The stack's processes: BentoML's own workers, started as its supervisors would start them.

    python -m inception_v3.workers [--bento service:svc] [--working-dir .]   # the plan, as JSON

``bentoml start-runner-server``, ``start-http-server`` and ``start-grpc-server``
are each a circus arbiter that imports the whole service to start one kind of
worker: 77-78 MiB each (PSS), three of them, serving nothing. The launcher
starts BentoML's workers itself, with the arguments those arbiters build
(``bentoml/start.py`` in 1.4.39), and holds their listening sockets as circus
does, so a worker that dies is restarted without a refused connection. The
runner's worker count and environment come from BentoML's own scheduling
strategy (a GPU per worker, thread counts), read from a ``Runner`` built
without a model. Reading BentoML's settings and that strategy imports BentoML
(33 MiB), so ``planned`` asks a short-lived process for the plan and the
launcher stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

from .settings import PROJECT_ROOT, SERVICE_NAME, load_settings

RUNNER_MODULE = "bentoml_cli.worker.runner"
HTTP_MODULE = "bentoml_cli.worker.http_api_server"
GRPC_MODULE = "bentoml_cli.worker.grpc_api_server"
GRPC_METRICS_MODULE = "inception_v3.grpc_metrics"  # BentoML's metrics server, answering at /metrics too
FD = "{fd}"  # in a command: the number of the listening socket it inherits


@dataclasses.dataclass(frozen=True)
class Address:
    host: str
    port: int
    backlog: int


@dataclasses.dataclass
class Worker:
    kind: str  # runner, http, grpc or grpc-metrics
    index: int  # 1-based, as circus numbers workers (BentoML's --worker-id)
    command: list[str]
    env: dict[str, str]  # on top of the launcher's
    listens: Address | None = None  # a socket the launcher binds and the worker inherits (FD in its command)
    holds_model: bool = False  # loads the model (versions.RELOAD_SIGNAL makes it look at the store)

    @property
    def name(self) -> str:
        return self.kind if self.index == 1 else f"{self.kind}-{self.index}"


def listen(address: Address) -> socket.socket:
    """A listening socket the workers inherit; OSError names the port when it is taken."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        listener = socket.create_server((address.host, address.port), family=family, backlog=address.backlog)
    except OSError as error:
        raise OSError(error.errno, f"cannot listen on {address.host}:{address.port}: {error.strerror}") from None
    listener.set_inheritable(True)
    return listener


def runner_worker_envs() -> list[dict[str, str]]:
    """One environment per runner worker, as BentoML's scheduling strategy assigns them."""
    import bentoml

    from . import legacy  # noqa: F401  (quiets bentoml.legacy.Runner's deprecation notice)
    from .runner import InceptionV3Runnable

    runner = bentoml.legacy.Runner(InceptionV3Runnable, name=SERVICE_NAME)
    env_map = runner.scheduled_worker_env_map
    return [{key: str(value) for key, value in env_map[i].items()} for i in range(runner.scheduled_worker_count)]


def plan(bento: str, working_dir: Path) -> list[Worker]:
    """The runner's workers first (none with ``runner: embedded``: each API worker loads the model), then each door's.

    Ports, TLS and gRPC options come from BentoML's configuration, which the
    workers read too; ``runner_port`` and ``runner`` are the project's own settings.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml.grpc.utils import LATEST_PROTOCOL_VERSION
    from bentoml.serving import construct_ssl_args, ensure_prometheus_dir

    config = BentoMLContainer
    ssl, grpc = config.ssl, config.grpc
    backlog = config.api_server_config.backlog.get()
    env = {"PROMETHEUS_MULTIPROC_DIR": ensure_prometheus_dir()}
    python = [sys.executable, "-m"]
    common = ["--working-dir", str(working_dir)]
    settings = load_settings()
    runner_port, embedded = settings.runner_port, settings.embedded_runner
    runner_map = ["--runner-map", json.dumps({SERVICE_NAME: f"tcp://127.0.0.1:{runner_port}"})]
    workers: list[Worker] = []

    runner_address = Address("127.0.0.1", runner_port, backlog)
    runner_envs = json.dumps(dict(enumerate(envs := [] if embedded else runner_worker_envs())))
    for index in range(1, len(envs) + 1):
        command = [*python, RUNNER_MODULE, bento, "--runner-name", SERVICE_NAME, "--fd", FD, *common]
        command += ["--no-access-log", "--worker-id", str(index), "--worker-env-map", runner_envs]
        workers.append(Worker("runner", index, command, env, runner_address, holds_model=True))

    http_address = Address(config.http.host.get(), config.http.port.get(), backlog)
    http_ssl = construct_ssl_args(
        ssl_certfile=ssl.certfile.get(),
        ssl_keyfile=ssl.keyfile.get(),
        ssl_keyfile_password=ssl.keyfile_password.get(),
        ssl_version=ssl.version.get(),
        ssl_cert_reqs=ssl.cert_reqs.get(),
        ssl_ca_certs=ssl.ca_certs.get(),
        ssl_ciphers=ssl.ciphers.get(),
    )
    grpc_ssl = construct_ssl_args(
        ssl_certfile=ssl.certfile.get(), ssl_keyfile=ssl.keyfile.get(), ssl_ca_certs=ssl.ca_certs.get()
    )
    grpc_options = ["--protocol-version", LATEST_PROTOCOL_VERSION]
    grpc_options += ["--enable-reflection"] if grpc.reflection.enabled.get() else []
    grpc_options += ["--enable-channelz"] if grpc.channelz.enabled.get() else []
    if streams := grpc.max_concurrent_streams.get():
        grpc_options += ["--max-concurrent-streams", str(streams)]
    grpc_address = ["--host", grpc.host.get(), "--port", str(grpc.port.get())]
    for index in range(1, config.api_server_workers.get() + 1):
        worker = [*runner_map, *common, "--worker-id", str(index)]
        command = [*python, HTTP_MODULE, bento, "--fd", FD, "--backlog", str(backlog), *worker, *http_ssl]
        workers.append(Worker("http", index, command, env, http_address, holds_model=embedded))
        command = [*python, GRPC_MODULE, bento, *grpc_address, *worker, *grpc_ssl, *grpc_options]
        workers.append(Worker("grpc", index, command, env, holds_model=embedded))

    if config.api_server_config.metrics.enabled.get():
        metrics_address = Address(grpc.metrics.host.get(), grpc.metrics.port.get(), backlog)
        command = [*python, GRPC_METRICS_MODULE, "--fd", FD, "--backlog", str(backlog)]
        workers.append(Worker("grpc-metrics", 1, command, env, metrics_address))
    return workers


class PlanError(RuntimeError):
    pass


def planned(bento: str, working_dir: Path, env: dict[str, str]) -> list[Worker]:
    """``plan``, from a process of its own (see the module's docstring)."""
    command = [sys.executable, "-m", __name__, "--bento", bento, "--working-dir", str(working_dir)]
    answer = subprocess.run(command, env=env, cwd=working_dir, capture_output=True, text=True)
    if answer.returncode != 0:
        raise PlanError(f"could not plan the workers of {bento}:\n{answer.stderr.strip()}")
    return [
        Worker(**{**fields, "listens": Address(**fields["listens"]) if fields["listens"] else None})
        for fields in json.loads(answer.stdout)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bento", default="service:svc", help="service import path or Bento tag/path")
    parser.add_argument("--working-dir", type=Path, default=PROJECT_ROOT)
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the plan only
        workers = plan(args.bento, args.working_dir.resolve())
    print(json.dumps([dataclasses.asdict(worker) for worker in workers]))


if __name__ == "__main__":
    main()
