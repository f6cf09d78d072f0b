"""Serve HTTP and gRPC from one model in memory: one runner server, two API servers.

    python -m inception_v3.launcher [--bento service:svc] [--working-dir .]
    python -m inception_v3.launcher --wait-ready [--timeout 120]

``bentoml serve`` and ``bentoml serve-grpc`` each start a runner of their own
(two copies of TensorFlow and the model). This starts BentoML's distributed
pieces instead, as a cluster would: ``start-runner-server`` on ``runner_port``,
and ``start-http-server`` and ``start-grpc-server`` that both call it. The
launcher stays in the foreground; SIGTERM or SIGINT stops the API servers first
(they drain in-flight requests), then the runner; if any piece dies, it stops
the others and exits non-zero. Ports come from the configuration file.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from .settings import PROJECT_ROOT, SERVICE_NAME, Settings, load_settings

STOP_TIMEOUT_S = 30


def server_commands(bento: str, working_dir: Path, settings: Settings) -> dict[str, list[str]]:
    start = [sys.executable, "-m", "bentoml_cli._internal.start"]
    runner = f"{SERVICE_NAME}=tcp://127.0.0.1:{settings.runner_port}"
    common = [bento, "--working-dir", str(working_dir)]
    return {
        "runner": [
            *start,
            "start-runner-server",
            *common,
            "--runner-name",
            SERVICE_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.runner_port),
        ],
        "http": [
            *start,
            "start-http-server",
            *common,
            "--depends",
            runner,
            "--host",
            settings.http_host,
            "--port",
            str(settings.http_port),
            # start-grpc-server reads api_server.workers itself; start-http-server starts 1 without this.
            "--api-workers",
            str(settings.api_workers),
        ],
        "grpc": [*start, "start-grpc-server", *common, "--remote-runner", runner, "--port", str(settings.grpc_port)],
    }


def stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """API servers first, so they finish what they hold while the runner still answers."""
    for group in (("http", "grpc"), ("runner",)):
        members = [processes[name] for name in group if name in processes]
        trees = {p.pid: descendants(p.pid) for p in members}
        for process in members:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in members:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        # Workers live in process groups of their own; none may outlive the stop.
        for tree in trees.values():
            _gone, alive = psutil.wait_procs(tree, timeout=5)
            for leftover in alive:
                leftover.kill()


def wait_for_workers(process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Return once the server has started its workers (or died).

    Each BentoML server empties the shared Prometheus multiprocess folder when it
    starts, before it spawns workers; starting the next one only then keeps every
    worker's metric files.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None and not descendants(process.pid):
        time.sleep(0.1)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def serve(bento: str, working_dir: Path) -> int:
    settings = load_settings()
    env = {**os.environ, "BENTOML_CONFIG": str(settings.config_file)}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for name, command in server_commands(bento, working_dir, settings).items():
        processes[name] = subprocess.Popen(command, env=env, cwd=working_dir)
        wait_for_workers(processes[name])
    print(
        f"serving {bento}: HTTP on :{settings.http_port}, gRPC on :{settings.grpc_port}, "
        f"shared runner on 127.0.0.1:{settings.runner_port} (launcher pid {os.getpid()})",
        flush=True,
    )
    exit_code = 0
    while not stopping:
        dead = {name: p.returncode for name, p in processes.items() if p.poll() is not None}
        if dead:
            print(f"stopping: {dead} exited", file=sys.stderr, flush=True)
            exit_code = 1
            break
        time.sleep(0.5)
    stop(processes)
    return exit_code


def wait_ready(settings: Settings, timeout_s: float) -> bool:
    """HTTP /readyz and the gRPC health check both say ready."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    http_ready = grpc_ready = False
    while time.monotonic() < deadline:
        if not http_ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{settings.http_port}/readyz", timeout=2) as response:
                    http_ready = response.status == 200
            except OSError:
                pass
        if not grpc_ready:
            with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                try:
                    status = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="bentoml.grpc.v1.BentoService"), timeout=2
                    )
                    grpc_ready = status.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    pass
        if http_ready and grpc_ready:
            return True
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bento", default="service:svc", help="service import path or Bento tag/path")
    parser.add_argument("--working-dir", type=Path, default=PROJECT_ROOT)
    parser.add_argument("--wait-ready", action="store_true", help="wait until both servers are ready, then exit")
    parser.add_argument("--timeout", type=float, default=180, help="seconds --wait-ready waits")
    args = parser.parse_args(argv)
    if args.wait_ready:
        ready = wait_ready(load_settings(), args.timeout)
        print("ready" if ready else f"not ready after {args.timeout:.0f} s", file=sys.stdout if ready else sys.stderr)
        return 0 if ready else 1
    return serve(args.bento, args.working_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
