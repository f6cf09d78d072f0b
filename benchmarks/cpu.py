"""Where each request's CPU goes: stacks up at once, interleaved, CPU per request by process.

    python -m benchmarks.cpu --variant "" --variant "services.inception_v3.batch_patience=0" \\
        --concurrency 8 1 --rounds 4
    python -m benchmarks.cpu --variant "" --variant "services.inception_v3.embedded_batch_patience=0" \\
        --concurrency 8 --arrivals 30 60 80 --protocols http

Every variant's stack (``python -m inception_v3.launcher``, a model with int8 calibrated
on crops of cat.jpg, so ``services.inception_v3.precision=int8`` is a variant too) is up
for the whole run. Each round, for each variant (the order alternating), protocol and
concurrency (in the order given: ``8 1`` shows lone requests just after a burst), one
block of ``--requests`` requests (closed loops: each client sends its next when
answered; ``--arrivals`` adds open-loop blocks, requests sent at Poisson arrivals of
that many per second whether or not the earlier ones are answered, as independent
clients do), and the CPU time each process of that stack used during the block, from
``/proc``, divided by the requests. It prints, per variant and block kind, the median
p50 and p99 latency, the mean images/s and ratio to the first variant per round, and
the CPU milliseconds per request of the runner worker, each API server, the gRPC
metrics server, the launcher (with its watchdog) and this client; and the largest memory
of the stack's processes as a block ended: USS, which no other process changes, and PSS,
which the stacks up together lower by sharing library pages (``benchmarks.bench``
measures a stack's PSS alone).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.bench import (
    CALIBRATION_CROPS,
    IMAGE_FILE,
    PROTOCOLS,
    RESULTS_DIR,
    config_overrides,
    grpc_caller,
    http_caller,
    launched_stack,
    log,
    memory_of_tree,
    stack_environment,
    write_crops,
)
from inception_v3.launcher import wait_ready
from inception_v3.settings import PROJECT_ROOT, Settings, read_settings, write_config_on_free_ports

WARMUP_PER_CLIENT = 3
OPEN_LOOP_CONNECTIONS = 64  # open-loop requests in flight at most (each thread keeps a connection)
READY_TIMEOUT_S = 240


def cpu_by_process(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process and its descendants, by module name."""
    root = psutil.Process(pid)
    seconds: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            name = process.cmdline()[2].rsplit(".", 1)[-1]  # python -m <module> ...
        except (psutil.NoSuchProcess, IndexError):
            continue
        seconds[name] = seconds.get(name, 0.0) + times.user + times.system
    return seconds


def block(make_call: Callable[[], Callable[[], object]], concurrency: int, requests: int) -> dict[str, Any]:
    """``concurrency`` clients send ``requests`` requests in all, each its next when answered."""
    calls = [make_call() for _ in range(concurrency)]
    for call in calls:
        for _ in range(WARMUP_PER_CLIENT):
            call()
    latencies: list[float] = []
    lock = threading.Lock()

    def client(call: Callable[[], object]) -> None:
        while True:
            with lock:
                if len(latencies) >= requests:
                    return
            start = time.perf_counter()
            call()
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(call,)) for call in calls]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latency_figures(latencies, time.perf_counter() - started)


def arrivals_block(make_call: Callable[[], Callable[[], object]], rate: float, requests: int) -> dict[str, Any]:
    """``requests`` requests at Poisson arrivals of ``rate`` per second; each latency counts from its
    arrival, so time spent queued behind a busy server counts too."""
    own = threading.local()

    def send(arrival: float) -> float:
        if not hasattr(own, "call"):
            own.call = make_call()
        own.call()
        return time.perf_counter() - arrival

    arrivals = random.Random(requests)  # seeded: every variant gets the same arrival times
    with ThreadPoolExecutor(OPEN_LOOP_CONNECTIONS) as pool:
        started = arrival = time.perf_counter()
        sent = []
        for _ in range(requests):
            arrival += arrivals.expovariate(rate)
            time.sleep(max(0.0, arrival - time.perf_counter()))
            sent.append(pool.submit(send, arrival))
        latencies = [request.result() for request in sent]
    return latency_figures(latencies, time.perf_counter() - started)


def latency_figures(latencies: list[float], elapsed_s: float) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "images_per_s": len(latencies) / elapsed_s,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
    }


def measured_block(stack: Stack, protocol: str, load: str, requests: int) -> dict[str, Any]:
    """A block on one door of ``stack`` (``load``: ``c8``, closed loops, or ``30/s``, arrivals), with the CPU
    milliseconds per request of each of its processes."""
    image = IMAGE_FILE.read_bytes()
    ports = stack.settings
    caller = http_caller(ports.http_port, image) if protocol == "http" else grpc_caller(ports.grpc_port, image)
    before, client_before = cpu_by_process(stack.launcher.pid), time.process_time()
    if load.endswith("/s"):
        result = arrivals_block(caller, float(load[:-2]), requests)
    else:
        result = block(caller, int(load[1:]), requests)
    after, client_after = cpu_by_process(stack.launcher.pid), time.process_time()
    count = result["requests"]
    cpu = {name: 1000 * (seconds - before.get(name, 0.0)) / count for name, seconds in after.items()}
    memory = memory_of_tree(stack.launcher.pid).values()
    return {
        **result,
        "cpu_ms_per_request": {**cpu, "client": 1000 * (client_after - client_before) / count},
        "uss_mib": sum(m["uss"] for m in memory) / 2**20,
        "pss_mib": sum(m["pss"] for m in memory) / 2**20,
    }


@dataclass
class Stack:
    launcher: subprocess.Popen[bytes]
    settings: Settings


def start_stacks(stacks: ExitStack, work: Path, variants: list[str]) -> list[Stack]:
    """One stack per variant, all on one model store, all ready."""
    store = work / "bentoml"
    calibration = work / "calibration"
    calibration.mkdir()
    write_crops(IMAGE_FILE, calibration, CALIBRATION_CROPS)
    started = []
    for number, variant in enumerate(variants):
        folder = work / f"variant-{number}"
        folder.mkdir()
        config = write_config_on_free_ports(folder / "configuration.yaml", config_overrides(variant.split()))
        env = {**stack_environment(folder, config), "BENTOML_HOME": str(store)}
        if number == 0:
            save = ["save_model.py", "--random-weights", "--seed", "7", "--int8-calibration", str(calibration)]
            subprocess.run([sys.executable, *save], env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, check=True)
        settings = read_settings(config)
        launcher = stacks.enter_context(launched_stack(env, folder))
        started.append(Stack(launcher, settings))
    for number, stack in enumerate(started):
        if not wait_ready(stack.settings, READY_TIMEOUT_S, pid=stack.launcher.pid):
            raise RuntimeError(
                f"the stack of variant {number} did not get ready; see {work}/variant-{number}/serve.log"
            )
    return started


def report(variants: list[str], figures: list[dict[str, list[dict[str, Any]]]], rounds: int, requests: int) -> None:
    for kind, base_rows in figures[0].items():
        print(f"\n{kind}, {rounds} rounds of {requests} requests (images/s to the first variant, per round)")
        for variant, by_kind in zip(variants, figures, strict=True):
            rows = by_kind[kind]
            ratios = " ".join(
                f"{row['images_per_s'] / base['images_per_s']:.2f}" for row, base in zip(rows, base_rows, strict=True)
            )
            names = rows[0]["cpu_ms_per_request"]
            cpu = ", ".join(
                f"{n} {statistics.fmean(r['cpu_ms_per_request'].get(n, 0.0) for r in rows):.1f}" for n in names
            )
            print(
                f"  {variant or '(as configured)'}: p50 {statistics.median(r['p50_ms'] for r in rows):.1f} ms, "
                f"p99 {statistics.median(r['p99_ms'] for r in rows):.1f} ms, "
                f"{statistics.fmean(r['images_per_s'] for r in rows):.1f} images/s ({ratios}); "
                f"CPU ms per request: {cpu}; as the blocks ended, at most USS {max(r['uss_mib'] for r in rows):.0f} "
                f"MiB, PSS {max(r['pss_mib'] for r in rows):.0f} MiB"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help='"KEY=VALUE ..." ("" as configured)')
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8], help="blocks, in this order")
    parser.add_argument("--arrivals", nargs="*", type=float, default=[], help="open-loop blocks: requests/s")
    parser.add_argument("--requests", type=int, default=200, help="per block")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    loads = [f"c{concurrency}" for concurrency in args.concurrency] + [f"{rate:g}/s" for rate in args.arrivals]
    kinds = [(protocol, load) for load in loads for protocol in args.protocols]
    results: list[dict[str, list[dict[str, Any]]]] = [{f"{p} {load}": [] for p, load in kinds} for _ in args.variant]
    work = Path(tempfile.mkdtemp(prefix="inception-v3-cpu-"))
    try:
        with ExitStack() as stacks:
            started = start_stacks(stacks, work, args.variant)
            for round_number in range(args.rounds):
                order = list(enumerate(started))
                for number, stack in order if round_number % 2 == 0 else order[::-1]:
                    log(f"round {round_number + 1}/{args.rounds}: {args.variant[number] or '(as configured)'}")
                    for protocol, load in kinds:
                        results[number][f"{protocol} {load}"].append(
                            measured_block(stack, protocol, load, args.requests)
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args.variant, results, args.rounds, args.requests)
    output = RESULTS_DIR / f"cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    by_variant = [{"variant": v, "figures": by_kind} for v, by_kind in zip(args.variant, results, strict=True)]
    output.write_text(json.dumps({"options": vars(args), "results": by_variant}, indent=2))
    log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
