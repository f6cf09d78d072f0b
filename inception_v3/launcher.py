"""Serve HTTP and gRPC under one supervisor: two API servers and, with a shared runner, the runner.

    python -m inception_v3.launcher [--bento service:svc] [--working-dir .]
    python -m inception_v3.launcher --wait-ready [--timeout 180] [--pid PID]
    kill -HUP LAUNCHER_PID             # look at the model store for new versions now (make reload)

``bentoml serve`` and ``bentoml serve-grpc`` each start a runner of their own
(two copies of the model). This starts what BentoML's distributed commands
start, as a cluster would: with ``runner: shared`` the runner's worker on
``runner_port`` and the HTTP and gRPC API workers that both call it, each a piece
of its own, without those commands' supervisors (``inception_v3.workers``). The launcher holds the
listening sockets and stays in the foreground; SIGTERM or SIGINT stops the API
servers first (they drain in-flight requests), then the runner. Ports come from
the configuration file.

A piece that dies (any signal, SIGKILL included) is restarted alone, after a
backoff that doubles from ``FIRST_RESTART_DELAY_S`` up to ``MAX_RESTART_DELAY_S``;
the others go on serving (the API servers answer 503 while the runner is away,
``inception_v3.availability``; connections to a dead HTTP server wait in its
socket's backlog for the next one).
More than ``MAX_FAILURES`` deaths within ``FAILURE_WINDOW_S`` and the launcher
gives up: it stops everything and exits 1. No process outlives its piece or the
launcher (``inception_v3.lineage``): what a dead piece started is killed before
it is restarted; each piece dies with the launcher (PR_SET_PDEATHSIG) and a
watchdog kills what they started; at start, what a crashed run left in this
working directory is killed, and a configured port another process holds is
named with its pid.

With ``runner: embedded`` (what ``auto`` is for the OpenVINO engine) there is no
runner worker: each API server loads the model itself (BentoML's embedded runner;
no hop) and batches its own requests (``inception_v3.batching``).

SIGHUP asks the runner to look at the model store now (``versions``: it polls it
every ``model_poll_s`` seconds anyway): the launcher passes it on to the workers
that load the model (``Worker.holds_model``) as ``versions.RELOAD_SIGNAL``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from . import lineage, workers
from .settings import PROJECT_ROOT, Settings, load_settings
from .tls import ClientTls, grpc_channel, http_url
from .versions import RELOAD_SIGNAL

STOP_TIMEOUT_S = 30
POLL_S = 0.2
FIRST_RESTART_DELAY_S = 0.5  # doubled for each further death within the window
MAX_RESTART_DELAY_S = 8.0
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0


@dataclasses.dataclass
class Piece:
    worker: workers.Worker
    mark: str  # lineage.MARK of its process
    listener: socket.socket | None  # the socket it listens on, which the launcher holds
    process: subprocess.Popen[bytes] | None = None
    deaths: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return self.worker.name

    def start(self, env: dict[str, str], working_dir: Path) -> None:
        listener = self.listener
        fds = (listener.fileno(),) if listener else ()
        self.process = subprocess.Popen(
            [str(listener.fileno()) if arg == workers.FD and listener else arg for arg in self.worker.command],
            env={**env, **self.worker.env, lineage.MARK: self.mark},
            cwd=working_dir,
            process_group=0,  # Ctrl-C reaches the launcher only, which stops the pieces in order
            pass_fds=fds,
            preexec_fn=functools.partial(lineage.die_with_parent, os.getpid()),
        )
        self.restart_at = None

    def died(self, now: float) -> float | None:
        """Record a death; the delay before the restart, or None: too many deaths, give up."""
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > FAILURE_WINDOW_S:
            self.deaths.popleft()
        if len(self.deaths) > MAX_FAILURES:
            return None
        return min(FIRST_RESTART_DELAY_S * 2 ** (len(self.deaths) - 1), MAX_RESTART_DELAY_S)


def stop(pieces: dict[str, Piece]) -> None:
    """API servers first, so they finish what they hold while the runner still answers."""
    for last in (False, True):
        group = [piece for piece in pieces.values() if (piece.worker.kind == "runner") == last]
        members = [piece.process for piece in group if piece.process]
        for process in members:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in members:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        for piece in group:  # and anything a piece may have started
            lineage.kill_marked(piece.mark)


def clear_leftovers(working_dir: Path, settings: Settings) -> str | None:
    """Kill what a crashed run left here; a message if a configured port is still held."""
    for process in lineage.stale_leftovers(working_dir):
        print(f"killing pid {process.pid} left by a previous run: {' '.join(process.cmdline())}", flush=True)
        process.kill()
    ports = [settings.http_port, settings.grpc_port, settings.grpc_metrics_port, settings.runner_port]
    deadline = time.monotonic() + 5
    while (holders := lineage.port_holders(ports)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not holders:
        return None
    return "; ".join(
        f"port {port} is held by "
        + (f"pid {holder.pid} ({' '.join(holder.cmdline())})" if holder else "a process of another user")
        for port, holder in sorted(holders.items())
    )


def supervise(piece: Piece, env: dict[str, str], working_dir: Path) -> bool:
    """Restart a dead piece when its backoff is over; False: it died too often, give up."""
    now = time.monotonic()
    if piece.restart_at is not None:
        if now >= piece.restart_at:
            print(f"restarting {piece.name}", flush=True)
            piece.start(env, working_dir)
        return True
    code = piece.process.poll()
    if code is None:
        return True
    killed = lineage.kill_marked(piece.mark)
    delay = piece.died(now)
    what = f"{piece.name} exited ({code})" + (f", its leftover processes {killed} killed" if killed else "")
    outcome = "giving up" if delay is None else f"restarting it in {delay:.1f} s"
    print(f"{what}, {len(piece.deaths)} times in {FAILURE_WINDOW_S:.0f} s; {outcome}", file=sys.stderr, flush=True)
    if delay is None:
        return False
    piece.restart_at = now + delay
    return True


def ask_model_holders_to_reload(pieces: dict[str, Piece]) -> None:
    """Pass SIGHUP on to the workers that load the model, which look at the model store at once."""
    holders = [piece.process for piece in pieces.values() if piece.worker.holds_model and piece.process]
    for process in holders:
        if process.poll() is None:
            process.send_signal(RELOAD_SIGNAL)
    print(f"asked the workers {[p.pid for p in holders]} to look for new model versions", flush=True)


def serve(bento: str, working_dir: Path) -> int:
    settings = load_settings()
    os.environ.pop(lineage.MARK, None)
    held = clear_leftovers(working_dir, settings)
    if held:
        print(f"cannot serve: {held}", file=sys.stderr, flush=True)
        return 1
    me = lineage.identity(psutil.Process())
    lineage.start_watchdog(f"{me}:")
    # gRPC's C core logs at INFO before absl is set up ("skipping fork() handlers" and a line saying so);
    # its errors still show. GRPC_VERBOSITY in the environment wins.
    env = {"GRPC_VERBOSITY": "ERROR", **os.environ, "BENTOML_CONFIG": str(settings.config_file)}
    try:
        planned = workers.planned(bento, working_dir, env)
        addresses = {worker.listens for worker in planned if worker.listens}  # workers of a kind share one
        listeners = {address: workers.listen(address) for address in addresses}
    except (workers.PlanError, OSError) as error:
        print(f"cannot serve: {error.strerror if isinstance(error, OSError) else error}", file=sys.stderr, flush=True)
        return 1
    # The "/" ends each mark: no piece's mark is the start of another's ("http" and "http-2").
    pieces = {worker.name: Piece(worker, f"{me}:{worker.name}/", listeners.get(worker.listens)) for worker in planned}
    stopping = reload_asked = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def request_reload(signum: int, _frame: object) -> None:
        nonlocal reload_asked
        reload_asked = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    for piece in pieces.values():
        piece.start(env, working_dir)
    runner = f"shared runner on 127.0.0.1:{settings.runner_port}"
    if settings.embedded_runner:
        runner = "the model loaded by each API server (runner: embedded)"
    print(
        f"serving {bento}: HTTP on :{settings.http_port}, gRPC on :{settings.grpc_port}, "
        f"{runner} (launcher pid {os.getpid()})",
        flush=True,
    )
    exit_code = 0
    while not stopping:
        if not all(supervise(piece, env, working_dir) for piece in pieces.values()):
            exit_code = 1
            break
        if reload_asked:
            reload_asked = False
            ask_model_holders_to_reload(pieces)
        time.sleep(POLL_S)
    started_stopping = time.monotonic()
    if stopping:
        print("stopping: each server finishes the requests it holds", flush=True)
    stop(pieces)
    print(f"stopped {bento} in {time.monotonic() - started_stopping:.1f} s", flush=True)
    return exit_code


def wait_ready(settings: Settings, timeout_s: float, pid: int | None = None, tls: ClientTls | None = None) -> bool:
    """HTTP /readyz and the gRPC health check both say ready (False at once if process ``pid`` is gone).

    ``tls``: how to connect when the servers serve TLS (``api_server.ssl``).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    http_ready = grpc_ready = False
    while time.monotonic() < deadline and (pid is None or psutil.pid_exists(pid)):
        if not http_ready:
            try:
                url = http_url(f"127.0.0.1:{settings.http_port}", tls) + "/readyz"
                context = tls.ssl_context() if tls else None
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    http_ready = response.status == 200
            except OSError:
                pass
        if not grpc_ready:
            with grpc_channel(f"127.0.0.1:{settings.grpc_port}", tls) as channel:
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


def addresses(settings: Settings) -> str:
    """Where the doors are, from the configuration's ports, for ``make serve`` and ``make run`` to print."""
    http = http_url(f"localhost:{settings.http_port}", ClientTls() if settings.tls else None)
    model = settings.model_tag.partition(":")[0]
    grpc_services = "bentoml.grpc.v1.BentoService, tensorflow.serving.PredictionService, inference.GRPCInferenceService"
    return (
        f"HTTP  {http}  (Swagger UI at /, TF Serving REST at /v1/models/{model}, Open Inference at /v2)\n"
        f"gRPC  localhost:{settings.grpc_port}  ({grpc_services})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bento", default="service:svc", help="service import path or Bento tag/path")
    parser.add_argument("--working-dir", type=Path, default=PROJECT_ROOT)
    parser.add_argument("--wait-ready", action="store_true", help="wait until both servers are ready, then exit")
    parser.add_argument("--timeout", type=float, default=180, help="seconds --wait-ready waits")
    parser.add_argument("--pid", type=int, help="with --wait-ready: stop waiting if this process (the launcher) exits")
    parser.add_argument(
        "--ca-cert", type=Path, help="with --wait-ready and TLS: the servers' CA (default: ssl.ca_certs)"
    )
    parser.add_argument("--cert", type=Path, help="with --wait-ready and mutual TLS: a client certificate")
    parser.add_argument("--key", type=Path, help="with --wait-ready and mutual TLS: its private key")
    parser.add_argument("--addresses", action="store_true", help="print where the doors are, then exit")
    args = parser.parse_args(argv)
    if args.addresses:
        print(addresses(load_settings()))
        return 0
    if args.wait_ready:
        settings = load_settings()
        ca_cert = args.ca_cert or (Path(settings.tls_ca_certs) if settings.tls_ca_certs else None)
        tls = ClientTls(ca_cert, args.cert, args.key) if settings.tls else None
        ready = wait_ready(settings, args.timeout, args.pid, tls)
        if ready:
            print("ready")
        elif args.pid and not psutil.pid_exists(args.pid):
            print(f"the launcher (pid {args.pid}) exited", file=sys.stderr)
        else:
            print(f"not ready after {args.timeout:.0f} s", file=sys.stderr)
        return 0 if ready else 1
    return serve(args.bento, args.working_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
