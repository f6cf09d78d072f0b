"""Issue 16 against a real ``make serve`` launcher: pieces killed with SIGKILL under load
are restarted while the other door goes on serving, and answers meanwhile are 200 or
503 (UNAVAILABLE), never a reset or a hang; the launcher killed with SIGKILL leaves
no process; a restart after a crash clears what was left, or names who holds a port;
a piece that keeps dying makes the launcher give up."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import yaml
from bentoml.grpc.v1 import service_pb2 as pb
from bentoml.grpc.v1 import service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inception_v3 import lineage
from inception_v3.launcher import FAILURE_WINDOW_S, MAX_FAILURES, Piece
from inception_v3.settings import read_settings, write_config_on_free_ports
from inception_v3.tls import ClientTls, grpc_channel, http_url
from inception_v3.workers import Worker
from tests.conftest import CAT_JPEG, ROOT, linked_bentoml_home, start_launcher

CAT = CAT_JPEG.read_bytes()
CALL_TIMEOUT_S = 10  # an answer slower than this counts as a hang
REFUSED_PAUSE_S = 0.2  # a client told to retry waits a little (the box has 2 cores for all)
READY_AGAIN_S = 15  # the target after a kill of the runner, where the runner starts fast enough


def test_backoff_doubles_then_gives_up() -> None:
    piece = Piece(Worker("runner", 1, [], {}), mark="", listener=None)
    delays = [piece.died(now=float(n)) for n in range(MAX_FAILURES + 1)]
    assert delays[:-1] == [0.5, 1.0, 2.0, 4.0, 8.0] and delays[-1] is None
    quiet = Piece(Worker("runner", 1, [], {}), mark="", listener=None)
    assert [quiet.died(now=n * (FAILURE_WINDOW_S + 1)) for n in range(10)] == [0.5] * 10


@dataclasses.dataclass
class Stack:
    process: subprocess.Popen[bytes]
    http: str
    grpc: str
    log: Path
    env: dict[str, str]
    tls: ClientTls | None = None
    cold_start_s: float = float("nan")

    def pieces(self) -> dict[str, psutil.Process]:
        """The launcher's live pieces (BentoML's workers), by name ("runner", "http", "grpc", "grpc-metrics")."""
        found = {}
        for child in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess, KeyError):
                found[child.environ()[lineage.MARK].rsplit(":", 1)[1].rstrip("/")] = child
        return found

    def processes(self) -> list[psutil.Process]:
        """Every process of the stack, workers included, by the launcher's mark."""
        return list(lineage.marked(f"{self.process.pid}:"))

    def http_ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            verify = self.tls.ssl_context() if self.tls else True
            return httpx.get(http_url(self.http, self.tls) + "/readyz", timeout=2, verify=verify).status_code == 200
        return False

    def grpc_ready(self) -> bool:
        with grpc_channel(self.grpc, self.tls) as channel:
            request = health_pb2.HealthCheckRequest(service="bentoml.grpc.v1.BentoService")
            with contextlib.suppress(grpc.RpcError):
                answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
                return answer.status == health_pb2.HealthCheckResponse.SERVING
        return False

    def wait_ready(self, timeout_s: float = 300) -> float:
        """Seconds until both doors are ready."""
        started = time.monotonic()
        while not (self.http_ready() and self.grpc_ready()):
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() - started < timeout_s, self.log.read_text()[-3000:]
            time.sleep(0.3)
        return time.monotonic() - started


def start_stack(
    name: str, overrides: dict | None = None, tls: ClientTls | None = None, env: dict[str, str] | None = None
) -> Stack:
    launch = start_launcher(name, overrides, env)
    return Stack(
        launch.process,
        http=launch.address("api_server", "http"),
        grpc=launch.address("api_server", "grpc"),
        log=launch.log,
        env=launch.env,
        tls=tls,
    )


def stop_stack(stack: Stack) -> None:
    leftovers = stack.processes()
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        stack.process.wait(timeout=90)
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for process in alive:
        process.kill()
    assert alive == [], alive


@pytest.fixture(scope="module")
def stack(saved_model: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The launcher with ``runner: <request.param>`` (auto, the default: no runner process on a CPU)."""
    launched = start_stack(f"faults-{request.param}", {"services.inception_v3.runner": request.param})
    try:
        launched.cold_start_s = launched.wait_ready()
        yield launched
    finally:
        stop_stack(launched)


class Load:
    """Clients on both doors, each sending its next request once answered; answers by kind and time."""

    def __init__(self, stack: Stack, clients_per_door: int = 2) -> None:
        self.stack = stack
        self.answers: list[tuple[float, str, str]] = []  # (time, door, kind)
        self.stopped = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(2 * clients_per_door)
        self.futures = [self.pool.submit(self.http_client) for _ in range(clients_per_door)]
        self.futures += [self.pool.submit(self.grpc_client) for _ in range(clients_per_door)]

    def http_client(self) -> None:
        url = f"http://{self.stack.http}/predict"
        while not self.stopped.is_set():
            try:
                with httpx.Client(timeout=CALL_TIMEOUT_S) as session:
                    response = session.post(url, content=CAT, headers={"Content-Type": "image/jpeg"})
                kind = str(response.status_code)
                if response.status_code == 503:
                    assert response.headers["retry-after"]
                    time.sleep(REFUSED_PAUSE_S)
            except httpx.TimeoutException:
                kind = "hang"
            except httpx.TransportError as error:
                kind = f"reset ({type(error).__name__})"
            self.answers.append((time.monotonic(), "http", kind))

    def grpc_client(self) -> None:
        request = pb.Request(api_name="predict", file=pb.File(kind="image/jpeg", content=CAT))
        with grpc.insecure_channel(self.stack.grpc) as channel:
            stub = service_pb2_grpc.BentoServiceStub(channel)
            while not self.stopped.is_set():
                try:
                    stub.Call(request, timeout=CALL_TIMEOUT_S)
                    kind = "OK"
                except grpc.RpcError as error:
                    kind = "hang" if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else error.code().name
                    time.sleep(REFUSED_PAUSE_S)
                self.answers.append((time.monotonic(), "grpc", kind))

    def stop(self) -> None:
        self.stopped.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()

    def kinds(self, door: str, since: float = 0.0) -> collections.Counter[str]:
        return collections.Counter(kind for at, d, kind in self.answers if d == door and at >= since)

    def first(self, door: str, kind: str, since: float) -> float | None:
        return next((at for at, d, k in self.answers if d == door and k == kind and at >= since), None)


def kill_piece(stack: Stack, name: str) -> float:
    piece = stack.pieces()[name]
    piece.kill()
    return time.monotonic()


def wait_restarted(stack: Stack, name: str, old: psutil.Process, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while stack.pieces().get(name, old).pid == old.pid:
        assert time.monotonic() < deadline, stack.log.read_text()[-3000:]
        time.sleep(0.2)


@pytest.mark.servers
@pytest.mark.parametrize("stack", ["shared"], indirect=True)
def test_runner_killed_under_load_is_restarted_with_only_200_and_503_meanwhile(stack: Stack) -> None:
    """The runner's worker, which the launcher restarts (BentoML's workers run without its supervisors)."""
    runner = stack.pieces()["runner"]
    load = Load(stack)
    try:
        time.sleep(3)
        runner.kill()
        killed = time.monotonic()
        # Restarted after 0.5 s and back in 3-4 s with OpenVINO on a quiet box, the runner may
        # return before the API servers call it gone (they probe it every 0.5 s, 3 s stale).
        while (stack.http_ready() or stack.grpc_ready()) and time.monotonic() - killed < 5:
            time.sleep(0.1)
        seen_down = time.monotonic() - killed < 5
        while not (stack.http_ready() and stack.grpc_ready()):
            assert time.monotonic() - killed < 120, stack.log.read_text()[-3000:]
            time.sleep(0.2)
        ready_after = time.monotonic() - killed
        time.sleep(2)
    finally:
        load.stop()
    http, grpc_kinds = load.kinds("http", since=killed), load.kinds("grpc", since=killed)
    serving = {
        door: (load.first(door, ok, killed) or float("nan")) - killed for door, ok in (("http", "200"), ("grpc", "OK"))
    }
    print(
        f"\nkill -9 of the runner under load: ready again after {ready_after:.1f} s (cold start of the stack: "
        f"{stack.cold_start_s:.1f} s); first 200 after "
        f"{serving['http']:.1f} s (HTTP), first OK after {serving['grpc']:.1f} s (gRPC); answers since the kill: "
        f"HTTP {dict(http)}, gRPC {dict(grpc_kinds)}"
    )
    assert set(http) <= {"200", "503"} and set(grpc_kinds) <= {"OK", "UNAVAILABLE"}, (http, grpc_kinds)
    assert (http["503"] and grpc_kinds["UNAVAILABLE"]) or not seen_down
    # The launcher notices a death within POLL_S and restarts after 0.5 s; the rest is the runner's own
    # start (BentoML, TensorFlow, the model, its warm-up), which a loaded 2-core box makes longer than 15 s.
    assert max(*serving.values(), ready_after) < max(READY_AGAIN_S, 1.5 * stack.cold_start_s)
    log = stack.log.read_text()
    # BentoML's access log has the real status (requests may also wait in the runner's backlog and see none).
    assert ("grpc_status=14" in log or not grpc_kinds["UNAVAILABLE"]) and "grpc_status=13" not in log
    assert not runner.is_running() and stack.pieces()["runner"].pid != runner.pid


@pytest.mark.servers
@pytest.mark.parametrize("stack", ["auto", "shared"], indirect=True)
@pytest.mark.parametrize(("victim", "other"), [("http", "grpc"), ("grpc", "http")])
def test_api_server_killed_other_door_serves_on(stack: Stack, victim: str, other: str) -> None:
    old = stack.pieces()[victim]
    load = Load(stack, clients_per_door=1)
    try:
        time.sleep(1)
        killed = kill_piece(stack, victim)
        wait_restarted(stack, victim, old)
        stack.wait_ready(timeout_s=60)
        back = time.monotonic() - killed
        time.sleep(1)
    finally:
        load.stop()
    survivor = load.kinds(other, since=killed)
    print(f"\nkill -9 of the {victim} server: ready again after {back:.1f} s; the {other} door: {dict(survivor)}")
    assert set(survivor) == {"200" if other == "http" else "OK"}, survivor
    assert not psutil.pid_exists(old.pid)


@pytest.mark.servers
def test_piece_dying_too_often_makes_the_launcher_give_up(saved_model: str) -> None:
    stack = start_stack("faults-give-up")
    try:
        stack.wait_ready()
        for _ in range(MAX_FAILURES + 1):
            old = stack.pieces()["grpc"]
            old.kill()
            if stack.process.poll() is None:
                with contextlib.suppress(AssertionError):
                    wait_restarted(stack, "grpc", old, timeout_s=30)
        assert stack.process.wait(timeout=120) == 1
        assert "giving up" in stack.log.read_text()
        _, alive = psutil.wait_procs(stack.processes(), timeout=10)
        assert alive == []
    finally:
        stop_stack(stack)


@pytest.mark.servers
def test_launcher_killed_leaves_no_process_and_a_restart_clears_leftovers(saved_model: str) -> None:
    stack = start_stack("faults-crash")
    try:
        stack.wait_ready()
        processes = stack.processes()
        doors = {"http", "grpc", "grpc-metrics"}
        expected = doors if read_settings(Path(stack.env["BENTOML_CONFIG"])).embedded_runner else {"runner", *doors}
        assert set(stack.pieces()) == expected, stack.pieces()
        stack.process.kill()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(processes, timeout=5)
        gone_s = time.monotonic() - killed
        print(f"\nkill -9 of the launcher: {len(processes)} processes, {len(alive)} left after {gone_s:.1f} s")
        assert alive == []

        # Each piece dies with the launcher (PR_SET_PDEATHSIG); a process one of them started would
        # not: one marked as a piece of a launcher that is gone, in this directory, is cleared at start.
        dead_launcher = "1:0.00:runner/"
        leftover = subprocess.Popen(["sleep", "300"], cwd=ROOT, env={**os.environ, lineage.MARK: dead_launcher})
        stack = start_stack("faults-crash")
        stack.wait_ready()
        assert f"killing pid {leftover.pid} left by a previous run" in stack.log.read_text()
        assert leftover.wait(timeout=5) == -signal.SIGKILL
    finally:
        stop_stack(stack)


@pytest.mark.servers
def test_a_held_port_is_named_with_its_pid(saved_model: str) -> None:
    home = linked_bentoml_home("faults-held")
    config_file = write_config_on_free_ports(home / "configuration.yaml")
    port = yaml.safe_load(config_file.read_text())["api_server"]["http"]["port"]
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_CONFIG": str(config_file)}
    with socket.create_server(("127.0.0.1", port)):
        process = subprocess.run(
            [sys.executable, "-m", "inception_v3.launcher"], cwd=ROOT, env=env, capture_output=True, timeout=120
        )
    assert process.returncode == 1
    assert f"port {port} is held by pid {os.getpid()}" in process.stderr.decode()
