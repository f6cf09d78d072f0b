"""Model version swaps under load: lost requests, latency while swapping, memory across swaps.

    python -m benchmarks.swaps              # 5 swaps at concurrency 8, about 2 minutes on 2 cores
    python -m benchmarks.swaps --publish    # also copy the JSON to docs/swaps.json

The real serving stack (``python -m inception_v3.launcher``: one runner, HTTP and
gRPC API servers) serves a random-weights model from a model store of its own,
with the configuration's ``model_poll_s``. Clients (half on HTTP ``/predict``, half
on gRPC ``BentoService/Call``) keep it busy while, ``--swaps`` times, a new version
appears in the store (``benchmarks.model_copies``: as a save leaves it, by a
rename; a real save's 20 s of CPU would only blur what the server does). For each
swap: the time from the version appearing to the first answer it gives, the p99 of
requests that overlapped the swap (from the save to one second after the old
version ended) against the steady p99 before the first swap, and the whole stack's
PSS after the swap against before the first one. Every request that is not a 200
counts as lost. The load generator shares the CPU with the servers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench import (
    DOCS_DIR,
    IMAGE_FILE,
    RESULTS_DIR,
    grpc_caller,
    http_caller,
    launched_stack,
    log,
    machine,
    memory_of_tree,
    stack_environment,
)
from benchmarks.model_copies import add_version
from benchmarks.timing import percentile
from inception_v3.settings import PROJECT_ROOT, Settings, read_settings, write_config_on_free_ports

STEADY_S = 30.0  # also the warm-up of the stack's memory under this load
AFTER_SWAP_S = 1.0  # the swap's window ends this long after the old version ended
SETTLE_S = 3.0  # between swaps: memory is measured at the end of it
TARGETS = {"lost_requests": 0, "pss_growth": 0.05}


class Load:
    """Closed-loop clients; each answer as (start, end, ok, version)."""

    def __init__(self, http_port: int, grpc_port: int, concurrency: int) -> None:
        self.records: list[tuple[float, float, bool, int | None]] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        image = IMAGE_FILE.read_bytes()
        clients = [
            (http_caller(http_port, image)(), http_version)
            if n % 2 == 0
            else (grpc_caller(grpc_port, image)(), grpc_version)
            for n in range(concurrency)
        ]
        self.threads = [threading.Thread(target=self.run, args=client, daemon=True) for client in clients]
        for thread in self.threads:
            thread.start()

    def run(self, call: Callable[[], Any], version_of: Callable[[Any], int]) -> None:
        while not self.stopped.is_set():
            start = time.monotonic()
            try:
                version: int | None = version_of(call())
            except Exception:  # an error or not 200: counted as lost, never hidden
                version = None
            with self.lock:
                self.records.append((start, time.monotonic(), version is not None, version))

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()

    def p99_ms(self, since: float, until: float) -> float:
        """Of the requests that overlapped [since, until]."""
        with self.lock:
            latencies = [1000 * (end - start) for start, end, _, _ in self.records if end >= since and start <= until]
        return percentile(latencies, 99)

    def first_answer_from(self, version: int, since: float) -> float | None:
        with self.lock:
            return next((end for start, end, _, v in self.records if v == version and start >= since), None)

    def lost(self) -> int:
        with self.lock:
            return sum(not ok for _, _, ok, _ in self.records)


def http_version(body: bytes) -> int:
    return json.loads(body)["version"]


def grpc_version(response: Any) -> int:
    from google.protobuf import json_format

    return int(json_format.MessageToDict(response.json)["version"])


def model_statuses(http_port: int) -> dict[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models/inception_v3", timeout=10) as response:
        return {int(s["version"]): s["state"] for s in json.load(response)["model_version_status"]}


def wait(condition: Any, timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)
    return found


def stack_pss(pid: int) -> tuple[float, float]:
    """The whole stack's PSS and that of what holds the model (the runner worker, or each API
    server with an embedded runner), in GiB."""
    usage = memory_of_tree(pid)
    runner = [m["pss"] for name, m in usage.items() if "worker.runner" in name]
    holders = runner or [m["pss"] for name, m in usage.items() if "_api_server" in name]
    return sum(m["pss"] for m in usage.values()) / 2**30, sum(holders) / 2**30


def one_swap(load: Load, store: Path, settings: Settings) -> dict[str, Any]:
    """A new version appears; wait for its first answer and for the old one to end, then settle."""
    old = max(v for v, state in model_statuses(settings.http_port).items() if state == "AVAILABLE")
    new = old + 1
    saved = time.monotonic()
    add_version(store, "inception_v3:latest", new)
    answered = wait(lambda: load.first_answer_from(new, saved), 60 + settings.model_poll_s, "new version")
    wait(lambda: model_statuses(settings.http_port).get(old) == "END", 60, "old version ends")
    ended = time.monotonic()
    time.sleep(AFTER_SWAP_S)
    swap_p99 = load.p99_ms(saved, ended + AFTER_SWAP_S)
    time.sleep(SETTLE_S)
    return {"version": new, "save_to_serving_s": answered - saved, "p99_ms": swap_p99}


def run(swaps: int, concurrency: int, work: Path) -> dict[str, Any]:
    config = write_config_on_free_ports(work / "configuration.yaml")
    settings = read_settings(config)
    env = stack_environment(work, config)
    store = work / "bentoml" / "models"
    log("saving a random-weights model into the benchmark's own store")
    save = [sys.executable, "save_model.py", "--random-weights"]
    subprocess.run(save, env=env, cwd=PROJECT_ROOT, check=True, capture_output=True)
    from inception_v3.launcher import wait_ready

    with launched_stack(env, work) as launcher:
        if not wait_ready(settings, 240, launcher.pid):
            raise RuntimeError(f"the stack did not get ready; see {work / 'serve.log'}")
        load = Load(settings.http_port, settings.grpc_port, concurrency)
        steady_from = time.monotonic() + 3  # warm-up
        time.sleep(3 + STEADY_S)
        steady_p99 = load.p99_ms(steady_from, time.monotonic())
        pss_before, runner_before = stack_pss(launcher.pid)
        log(
            f"steady: p99 {steady_p99:.0f} ms at concurrency {concurrency}; stack PSS {pss_before:.3f} GiB "
            f"(the model's workers {runner_before:.3f})"
        )
        results = []
        for number in range(swaps):
            swap = one_swap(load, store, settings)
            swap["p99_vs_steady"] = swap["p99_ms"] / steady_p99
            swap["pss_gib"], swap["runner_pss_gib"] = stack_pss(launcher.pid)
            swap["pss_vs_before"] = swap["pss_gib"] / pss_before
            results.append(swap)
            log(
                f"swap {number + 1}/{swaps}: version {swap['version']} answered {swap['save_to_serving_s']:.2f} s "
                f"after it appeared; p99 {swap['p99_ms']:.0f} ms ({swap['p99_vs_steady']:.2f}x steady); "
                f"PSS {swap['pss_gib']:.3f} GiB ({swap['pss_vs_before']:.3f}x before; the model's workers "
                f"{swap['runner_pss_gib']:.3f})"
            )
        load.stop()
        requests = len(load.records)
        return {
            "concurrency": concurrency,
            "model_poll_s": settings.model_poll_s,
            "requests": requests,
            "lost_requests": load.lost(),
            "steady_p99_ms": steady_p99,
            "pss_before_gib": pss_before,
            "runner_pss_before_gib": runner_before,
            "swaps": results,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--publish", action="store_true", help="copy the JSON to docs/swaps.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="inception-v3-swaps-"))
    try:
        result = {
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine(),
            **run(args.swaps, args.concurrency, work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst_growth = max(s["pss_vs_before"] for s in result["swaps"]) - 1
    result["checks"] = {
        "lost_requests": {"value": result["lost_requests"], "target": 0, "met": result["lost_requests"] == 0},
        "pss_growth": {
            "value": worst_growth,
            "target": TARGETS["pss_growth"],
            "met": worst_growth <= TARGETS["pss_growth"],
        },
    }
    print(
        f"{result['requests']} requests at concurrency {args.concurrency}, {result['lost_requests']} lost (target 0); "
        f"steady p99 {result['steady_p99_ms']:.0f} ms"
    )
    print(f"{'swap':>4} {'save->serving s':>16} {'p99 ms':>8} {'vs steady':>10} {'PSS GiB':>8} {'vs before':>10}")
    for n, swap in enumerate(result["swaps"], 1):
        print(
            f"{n:>4} {swap['save_to_serving_s']:>16.2f} {swap['p99_ms']:>8.0f} {swap['p99_vs_steady']:>10.2f} "
            f"{swap['pss_gib']:>8.3f} {swap['pss_vs_before']:>10.3f}"
        )
    print(f"PSS growth across swaps: {100 * worst_growth:+.1f}% (target within +5%)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"swaps-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    log(f"wrote {path}")
    if args.publish:
        shutil.copyfile(path, DOCS_DIR / "swaps.json")
    return 0 if all(check["met"] for check in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
