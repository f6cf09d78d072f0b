"""Benchmark the served Inception v3 against in-process TensorFlow and OpenVINO, in one run.

    python -m benchmarks.bench            # about 15 minutes on 2 cores
    python -m benchmarks.bench --quick    # about 4 minutes, for checking the script
    python -m benchmarks.bench --publish  # also copy the JSON and PNG to docs/

One run measures, on this machine: the CPU's float32 matmul peak, plain Keras
Inception v3 inside a ``tf.function`` at batch sizes 1-16 (the reference every
ratio divides by: TensorFlow fp32), and every engine and precision the CPU
supports at batch 1, 8 and 16 (TensorFlow graph, XLA and oneDNN bf16; OpenVINO
fp32, bf16 and int8); then the real serving stack (``python -m
inception_v3.launcher``: one runner, an HTTP and a gRPC API server) on free ports
with a random-weights model (int8 calibrated on crops of cat.jpg) in a temporary
model store: cold start to ready, each protocol in closed loops at concurrency 1,
4, 8 and 16 and the proportional memory (PSS) of the whole process tree; last, the
targets' comparisons interleaved (``run_paired``): plain Keras, the in-process
pipeline of the served configuration (the service's own decoding and runnable, same
engine and precision, no server: the realistic ceiling), both protocols, and
``predict_batch`` with 16 images per request against the pipeline at batch 16 take
turns, so that the machine's drift from minute to minute cancels. The stack runs
at its default precision, then with int8 (interleaved phase only). It prints a
table, writes JSON and a PNG under ``benchmarks/results/`` and checks the targets
as ratios within each round.

Every phase runs in a process of its own, and the memory is measured before the
interleaved phase loads its models, so the benchmark's engines never share
pages with (and never lower the PSS of) the servers it measures. The load
generator shares the CPU with the servers, as any client on the same machine would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from benchmarks.timing import GFLOP_PER_IMAGE, batch_figures, latency_summary, timed_calls
from inception_v3 import engines
from inception_v3.memory import TRIM_AFTER_IDLE_S
from inception_v3.preprocessing import INPUT_SIZE, prepare_image
from inception_v3.runner import InceptionV3Runnable, runnable_init_params
from inception_v3.settings import PROJECT_ROOT, SERVICE_NAME, write_config_on_free_ports
from inception_v3.versions import requested

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
DOCS_DIR = PROJECT_ROOT / "docs"
IMAGE_FILE = PROJECT_ROOT / "cat.jpg"
BATCH_SIZES = (1, 2, 4, 8, 16)
CONCURRENCY = (1, 4, 8, 16)
PROTOCOLS = ("http", "grpc")
WARMUP_REQUESTS = 15
BACK_TO_BACK_S = 2.0  # of each contender's sequential calls in a row, after the interleaved ones
ENGINE_BATCH_SIZES = (1, 8, 16)
PAIRED_CONTENDERS = ("keras", "pipeline", *PROTOCOLS)
BATCH_CONTENDERS = ("pipeline_b16", "http_batch16")  # 16 images a call: in process, and one predict_batch request
BATCH_REQUEST_IMAGES = 16
CALIBRATION_CROPS = 16
ONEDNN_BF16_OPTION = "auto_mixed_precision_onednn_bfloat16"
SETTLE_S = 1.0  # past the servers' idle trim, before the memory is read
# Served c8 against TensorFlow fp32 at batch 8, by CPU class, at the default precision and with int8.
TARGET_VS_TENSORFLOW = {"bf16": 3.5, "avx2": 1.2, "int8": 6.0}
TARGETS = {
    "vs_pipeline_c8": 0.75,
    "batch16_vs_pipeline": 0.9,
    "sequential_p50_extra_ms": 4.0,
    "pss_gib": 0.7,
    "cold_start_s": 10.0,
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- phase 1: in-process (its own process) --------------------------------------------


def run_in_process(duration_s: float) -> dict[str, Any]:
    import tensorflow as tf

    import save_model

    log("saving a random-weights model, int8 calibrated on crops of cat.jpg, into the benchmark's own store")
    calibration = Path(tempfile.mkdtemp(prefix="calibration-"))
    write_crops(IMAGE_FILE, calibration, CALIBRATION_CROPS)
    assert save_model.main(["--random-weights", "--seed", "7", "--int8-calibration", str(calibration)]) == 0
    shutil.rmtree(calibration)

    n = 2048
    a = tf.random.uniform((n, n))
    matmul = tf.function(lambda x: tf.linalg.matmul(x, x))
    seconds = min(timed_calls(lambda: matmul(a).numpy(), min(duration_s, 4.0)))
    peak = 2 * n**3 / seconds / 1e9
    log(f"matmul peak: {peak:.1f} GFLOP/s (float32, {n}x{n})")

    keras_call = keras_calls()
    keras: dict[str, Any] = {}
    for batch_size in BATCH_SIZES:
        latencies = timed_calls(keras_call(batch_size), duration_s)
        keras[str(batch_size)] = batch_figures(batch_size, latencies)
        log(f"in-process Keras, batch {batch_size:2d}: {keras[str(batch_size)]['images_per_s']:.1f} img/s")
    best = max(keras, key=lambda b: keras[b]["images_per_s"])
    return {
        "matmul_peak_gflops": peak,
        "keras": keras,
        "engines": engine_table(duration_s),
        "best_batch_size": int(best),
        "model_gflops_at_best": GFLOP_PER_IMAGE * keras[best]["images_per_s"],
        "tensorflow": tf.__version__,
    }


def keras_calls() -> Callable[[int], Callable[[], object]]:
    """Plain Keras Inception v3 inside a ``tf.function``, the reference every ratio divides by:
    ``keras_calls()(batch_size)`` is one call of it on a batch of that many random images."""
    import tensorflow as tf

    from inception_v3.model import build_keras_model

    tf.keras.utils.set_random_seed(7)
    keras_model = build_keras_model(None)
    forward = tf.function(lambda x: keras_model(x, training=False))

    def call(batch_size: int) -> Callable[[], object]:
        x = tf.random.uniform((batch_size, INPUT_SIZE, INPUT_SIZE, 3), -1.0, 1.0)
        return lambda: forward(x).numpy()

    return call


def write_crops(image_file: Path, folder: Path, count: int) -> None:
    """``count`` different crops of one photo as JPEG files: calibration images when no others exist."""
    from PIL import Image

    photo = Image.open(image_file).convert("RGB")
    width, height = photo.size
    rng = np.random.default_rng(0)
    for i in range(count):
        side = int(rng.integers(min(width, height) // 2, min(width, height)))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        photo.crop((left, top, left + side, top + side)).save(folder / f"crop-{i}.jpg", quality=90)


def engine_calls() -> dict[str, Callable[[np.ndarray], object]]:
    """Every engine and precision this CPU supports, as the runner loads them: name to call."""
    import bentoml

    bento_model = bentoml.models.get(f"{SERVICE_NAME}:latest")
    offered = bento_model.info.metadata["openvino_precisions"]
    flags = engines.cpu_flags()
    has_bf16 = any(flag in flags for flag in engines.BF16_FLAGS)
    tensorflow_fp32 = engines.choose("tensorflow", "fp32", offered)
    calls: dict[str, Callable[[np.ndarray], object]] = {
        "tensorflow fp32 (graph)": with_onednn_bf16(engines.load(tensorflow_fp32, bento_model), False)
    }
    xla = engines.load(tensorflow_fp32, bento_model, xla_batch_sizes=ENGINE_BATCH_SIZES)
    xla.model.compiler.join()
    calls["tensorflow fp32 (XLA)"] = with_onednn_bf16(xla, False)
    if has_bf16:
        calls["tensorflow bf16 (oneDNN AMP)"] = with_onednn_bf16(engines.load(tensorflow_fp32, bento_model), True)
    for precision in ("fp32", "bf16", "int8"):
        if precision != "bf16" or has_bf16:
            calls[f"openvino {precision}"] = engines.load(engines.choose("openvino", precision, offered), bento_model)
    return calls


def with_onednn_bf16(call: Callable[[np.ndarray], object], enabled: bool) -> Callable[[np.ndarray], object]:
    """``call`` with TensorFlow's oneDNN bf16 rewrite on or off while it runs.

    The rewrite is a process-wide optimizer option, and it also applies to functions
    traced before it was set, the next time they run (TensorFlow keeps an instance of
    a function per setting): set once for the bf16 row, it turned the fp32 rows
    measured after it into bf16 too. So every TensorFlow row sets it for its own calls.
    """
    import tensorflow as tf

    def run(pixels: np.ndarray) -> object:
        previous = tf.config.optimizer.get_experimental_options().get(ONEDNN_BF16_OPTION, False)
        tf.config.optimizer.set_experimental_options({ONEDNN_BF16_OPTION: enabled})
        try:
            return call(pixels)
        finally:
            tf.config.optimizer.set_experimental_options({ONEDNN_BF16_OPTION: previous})

    return run


def engine_table(duration_s: float, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Each engine at each batch size in ``rounds`` interleaved turns (the median turn), so drift cancels."""
    pixels = np.stack([prepare_image(IMAGE_FILE.read_bytes())] * max(ENGINE_BATCH_SIZES))
    calls = engine_calls()
    turns: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {str(b): [] for b in ENGINE_BATCH_SIZES} for name in calls
    }
    for round_number in range(rounds):
        for name in calls if round_number % 2 == 0 else list(calls)[::-1]:
            for batch_size in ENGINE_BATCH_SIZES:
                batch = pixels[:batch_size]
                latencies = timed_calls(lambda: calls[name](batch), duration_s / rounds)  # noqa: B023
                turns[name][str(batch_size)].append(batch_figures(batch_size, latencies))
    table = {
        name: {size: sorted(rows, key=lambda row: row["images_per_s"])[len(rows) // 2] for size, rows in sizes.items()}
        for name, sizes in turns.items()
    }
    for name, sizes in table.items():
        figures = ", ".join(f"batch {size} {row['images_per_s']:.1f}" for size, row in sizes.items())
        log(f"in-process {name}: {figures} images/s")
    return table


# --- phase 2: load generator (its own process, while the servers run) ----------------


@dataclass
class LoadPoint:
    protocol: str
    concurrency: int
    duration_s: float


def http_caller(
    port: int, image: bytes, path: str = "/predict", content_type: str = "image/jpeg"
) -> Callable[[], Callable[[], bytes]]:
    """Each call: one request on a kept connection; the answer's body (not 200: an error)."""
    import http.client

    def make() -> Callable[[], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def call() -> bytes:
            connection.request("POST", path, body=image, headers={"Content-Type": content_type})
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
            return body

        return call

    return make


def http_batch_caller(port: int, image: bytes) -> Callable[[], Callable[[], bytes]]:
    """``predict_batch`` with ``BATCH_REQUEST_IMAGES`` copies of the image in one request."""
    import base64

    text = base64.b64encode(image).decode()
    body = json.dumps({"images": [text] * BATCH_REQUEST_IMAGES, "top_k": 1}).encode()
    return http_caller(port, body, path="/predict_batch", content_type="application/json")


def grpc_caller(port: int, image: bytes) -> Callable[[], Callable[[], Any]]:
    """Each call: one BentoService ``predict`` call on a shared channel; its Response."""
    import grpc
    from bentoml.grpc.v1 import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = service_pb2_grpc.BentoServiceStub(channel)
    request = service_pb2.Request(api_name="predict", file=service_pb2.File(kind="image/jpeg", content=image))

    def make() -> Callable[[], None]:
        return lambda: stub.Call(request, timeout=60)

    return make


def closed_loop(make_call: Callable[[], Callable[[], object]], point: LoadPoint) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last one is answered.

    Warm-up: at least ``WARMUP_REQUESTS`` answers and 2 s; then a timed window of
    ``duration_s``. Figures are of the requests sent and answered inside it.
    Throughput is, as for the in-process model, images over the time spent on them:
    for each client, its requests over the sum of their latencies, summed over the
    clients. (Counting the answers inside the window would move in steps of a whole
    batch: one batch of 8 more in a 6 s window is 1.3 images/s more.)
    """
    lock = threading.Lock()
    answered = 0
    window: dict[str, float] = {}
    warmed = threading.Event()
    done = threading.Event()
    records: list[tuple[int, float, float]] = []  # client, start, end
    errors: list[str] = []
    started = time.perf_counter()

    def client(number: int) -> None:
        nonlocal answered
        call = make_call()
        while not done.is_set():
            start = time.perf_counter()
            try:
                call()
            except Exception as error:  # counted and reported, never hidden
                with lock:
                    errors.append(str(error)[:200])
                continue
            end = time.perf_counter()
            with lock:
                answered += 1
                records.append((number, start, end))
                if not warmed.is_set() and answered >= WARMUP_REQUESTS and end - started >= 2:
                    window["start"] = end
                    warmed.set()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(point.concurrency)]
    for thread in threads:
        thread.start()
    warmed.wait(timeout=300)
    time.sleep(point.duration_s)
    window["end"] = time.perf_counter()
    done.set()
    for thread in threads:
        thread.join()
    if "start" not in window:
        raise RuntimeError(f"{point}: no warm-up within 300 s; {len(errors)} errors, e.g. {errors[:3]}")
    inside = [(n, end - start) for n, start, end in records if start >= window["start"] and end <= window["end"]]
    latencies = [latency for _, latency in inside]
    per_client = [[latency for n, latency in inside if n == number] for number in range(point.concurrency)]
    return {
        "protocol": point.protocol,
        "concurrency": point.concurrency,
        "window_s": window["end"] - window["start"],
        "requests": len(inside),
        "images_per_s": sum(len(own) / sum(own) for own in per_client if own),
        **latency_summary(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
    }


def run_load(t0: float, points: list[LoadPoint], ready_timeout_s: float) -> dict[str, Any]:
    from inception_v3.launcher import wait_ready
    from inception_v3.settings import load_settings

    settings = load_settings()
    if not wait_ready(settings, ready_timeout_s):
        raise RuntimeError(f"servers not ready after {ready_timeout_s:.0f} s")
    cold_start = time.time() - t0
    at_ready = machine_counters()
    log(f"both servers ready {cold_start:.1f} s after the launcher started")
    image = IMAGE_FILE.read_bytes()
    callers = {"http": http_caller(settings.http_port, image), "grpc": grpc_caller(settings.grpc_port, image)}
    first = {}
    for protocol, make in callers.items():
        start = time.perf_counter()
        make()()
        first[protocol] = 1000 * (time.perf_counter() - start)
    results = []
    for i, point in enumerate(points, 1):
        log(f"[{i}/{len(points)}] {point.protocol} at concurrency {point.concurrency} ({point.duration_s:.0f} s) ...")
        result = closed_loop(callers[point.protocol], point)
        log(
            f"      {result['images_per_s']:.1f} images/s, p50 {result['p50_ms']:.0f} ms, "
            f"p99 {result['p99_ms']:.0f} ms ({result['requests']} requests, {result['errors']} errors)"
        )
        results.append(result)
    return {"cold_start_s": cold_start, "counters_at_ready": at_ready, "first_request_ms": first, "points": results}


# --- phase 3: the targets, interleaved (its own process, while the servers idle or run) --


def rotated(names: tuple[str, ...], by: int) -> tuple[str, ...]:
    by %= len(names)
    return names[by:] + names[:by]


def run_paired(rounds: int, duration_s: float, sequential_requests: int) -> dict[str, Any]:
    """Plain Keras, the in-process pipeline and both served protocols, taking turns.

    Sequential (batch size or concurrency 1): after ``WARMUP_REQUESTS`` of each, one
    call of each after the other, ``sequential_requests`` times, the order rotating,
    so that every comparison is between calls made within a second of each other; then
    ``BACK_TO_BACK_S`` of each one's calls in a row, for comparison only: between two
    interleaved calls of one contender the others run for about 100 ms, and on the 2-core
    VMs measured the served path took more CPU time after such a pause than the pipeline
    did (``docs/performance.md``), while a client that calls again at once finds it warm.
    Throughput (batch size or concurrency 8): ``rounds`` rounds, each measuring each
    of them for ``duration_s`` (a closed loop needs a steady state), in an order
    reversed every other round; ratios are taken within a round. This machine's
    speed drifts by 10-20% within minutes; side by side, the drift cancels. While an
    in-process contender runs, the idle serving stack uses about 0.01 cores.
    """
    import bentoml

    from inception_v3.engines.tensorflow import CompiledModel
    from inception_v3.settings import load_settings

    settings = load_settings()
    image = IMAGE_FILE.read_bytes()
    keras_call = keras_calls()
    runnable = InceptionV3Runnable(**runnable_init_params(bentoml.models.get(settings.model_tag), settings))
    if isinstance(getattr(runnable.engine, "model", None), CompiledModel):
        runnable.engine.model.compiler.join()  # as in the servers by the time they are measured
    callers = {
        "http": http_caller(settings.http_port, image),
        "grpc": grpc_caller(settings.grpc_port, image),
        "http_batch16": http_batch_caller(settings.http_port, image),
    }

    def pipeline(batch_size: int) -> Callable[[], object]:
        """What the service does for ``batch_size`` images, in process: decode each, one engine call."""
        return lambda: runnable.classify(
            np.stack([prepare_image(image) for _ in range(batch_size)]), requested(batch_size)
        )

    def in_process(batch_size: int) -> dict[str, Callable[[], object]]:
        return {"keras": keras_call(batch_size), "pipeline": pipeline(batch_size)}

    single = {**in_process(1), **{protocol: callers[protocol]() for protocol in PROTOCOLS}}
    latencies: dict[str, list[float]] = {name: [] for name in PAIRED_CONTENDERS}
    for _ in range(WARMUP_REQUESTS):
        for call in single.values():
            call()
    for i in range(sequential_requests):
        for name in rotated(PAIRED_CONTENDERS, i):
            start = time.perf_counter()
            single[name]()
            latencies[name].append(time.perf_counter() - start)
    sequential = {name: {**batch_figures(1, values), "requests": len(values)} for name, values in latencies.items()}
    log("sequential, interleaved: " + ", ".join(f"{n} p50 {f['p50_ms']:.1f} ms" for n, f in sequential.items()))
    doors_first = reversed(single.items())  # while their kept connections are fresh (uvicorn closes one idle 5 s)
    measured = [(name, batch_figures(1, timed_calls(call, BACK_TO_BACK_S, 1))) for name, call in doors_first]
    back_to_back = dict(reversed(measured))
    log("sequential, back to back: " + ", ".join(f"{n} p50 {f['p50_ms']:.1f} ms" for n, f in back_to_back.items()))

    batched = {**in_process(8), "pipeline_b16": pipeline(BATCH_REQUEST_IMAGES)}
    for call in batched.values():  # traced and warm before the first round
        call()
    contenders = (*PAIRED_CONTENDERS, *BATCH_CONTENDERS)
    throughput: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for round_number in range(rounds):
        for name in contenders if round_number % 2 == 0 else contenders[::-1]:
            if name == "http_batch16":  # one client: each request is a whole batch
                figure = closed_loop(callers[name], LoadPoint(name, 1, duration_s))
                figure["images_per_s"] *= BATCH_REQUEST_IMAGES
            elif name in callers:
                figure = closed_loop(callers[name], LoadPoint(name, 8, duration_s))
            else:
                size = BATCH_REQUEST_IMAGES if name == "pipeline_b16" else 8
                figure = batch_figures(size, timed_calls(batched[name], duration_s, warmup_calls=1))
            throughput[name].append(figure)
        log(
            f"throughput at 8, round {round_number + 1}/{rounds}: "
            + ", ".join(f"{name} {rows[-1]['images_per_s']:.2f} images/s" for name, rows in throughput.items())
        )
    return {
        "rounds": rounds,
        "duration_s": duration_s,
        "sequential": sequential,
        "sequential_back_to_back": back_to_back,
        "throughput": throughput,
    }


# --- orchestration --------------------------------------------------------------------


def memory_of_tree(pid: int) -> dict[str, dict[str, int]]:
    """PSS and USS in bytes of a process and all its descendants, keyed 'pid name'.

    PSS splits each shared page among every process that maps it, outside this tree
    too (other TensorFlow processes from the same environment lower it); the USS sum
    counts no shared page at all, a lower bound that no other process changes.
    """
    root = psutil.Process(pid)
    usage = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            name = f"{process.pid} {' '.join(process.cmdline()[2:4]) or process.name()}"
        except psutil.NoSuchProcess:
            continue
        usage[name] = {"pss": info.pss, "uss": info.uss}
    return usage


def child(args: list[str], env: dict[str, str], output: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench", *args, "--output", str(output)]
    subprocess.run(command, env=env, stdout=sys.stderr, check=True)
    return json.loads(output.read_text())


def machine_counters() -> dict[str, float]:
    """Since boot: CPU seconds this machine's processes ran, CPU seconds the hypervisor
    gave to other guests (steal), and MiB read from disk.

    On a shared VM steal and disk speed vary from hour to hour and slow a start whose
    files the page cache no longer holds; the cold start is reported with their share of it.
    """
    times = psutil.cpu_times()._asdict()
    not_ours = sum(times.get(k, 0.0) for k in ("idle", "iowait", "steal", "guest", "guest_nice"))
    vmstat = Path("/proc/vmstat").read_text().splitlines()
    pages_in_kib = next(int(line.split()[1]) for line in vmstat if line.startswith("pgpgin "))
    return {
        "busy_cpu_s": sum(times.values()) - not_ours,
        "stolen_cpu_s": times.get("steal", 0.0),
        "disk_read_mib": pages_in_kib / 1024,
    }


def counters_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in before}


def machine() -> dict[str, Any]:
    flags = engines.cpu_flags()
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {
        "cpu": model,
        "cores": psutil.cpu_count(logical=True),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_flags": [f for f in wanted if f in flags],
        "gpu": "none",
        "python": platform.python_version(),
    }


def config_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (values in YAML) to ``write_config_on_free_ports`` overrides."""
    return {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in items)}


def stack_environment(work: Path, config: Path) -> dict[str, str]:
    """A model store and configuration of the benchmark's own, for every process it starts."""
    return {
        **os.environ,
        "BENTOML_HOME": str(work / "bentoml"),
        "BENTOML_CONFIG": str(config),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONPATH": str(PROJECT_ROOT),
    }


@contextlib.contextmanager
def launched_stack(env: dict[str, str], work: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m inception_v3.launcher`` in the benchmark's environment, logging to work/serve.log; stopped after."""
    with (work / "serve.log").open("wb") as log_file:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "inception_v3.launcher"], env=env, cwd=PROJECT_ROOT, stdout=log_file, stderr=log_file
        )
        try:
            yield launcher
        finally:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launcher.kill()


def run_stack(
    env: dict[str, str], work: Path, points: list[LoadPoint], interleaved: tuple[int, float, int] | None = None
) -> dict[str, Any]:
    """Start the stack, run the load points, measure its memory, then ``run_paired(*interleaved)``."""
    t0, at_launch = time.time(), machine_counters()
    with launched_stack(env, work) as launcher:
        load_args = ["load", "--t0", str(t0), "--points", json.dumps([p.__dict__ for p in points])]
        load = child(load_args, env, work / "load.json")
        if launcher.poll() is not None:
            raise RuntimeError(f"the launcher exited with {launcher.returncode}; see {work / 'serve.log'}")
        starting = counters_between(at_launch, load.pop("counters_at_ready"))
        load["cold_start_disk_read_mib"] = starting["disk_read_mib"]
        load["cold_start_stolen_cores"] = starting["stolen_cpu_s"] / load["cold_start_s"]
        ran = re.search(r"runs on (.+?); loaded", (work / "serve.log").read_text(errors="replace"))
        load["engine"] = ran.group(1) if ran else "unknown"
        at_end = memory_of_tree(launcher.pid)
        time.sleep(TRIM_AFTER_IDLE_S + SETTLE_S)  # each server hands back what the load freed once idle
        processes = memory_of_tree(launcher.pid)
        load["pss_at_end_gib"] = sum(m["pss"] for m in at_end.values()) / 2**30
        load["pss_processes_mib"] = {name: round(m["pss"] / 2**20, 1) for name, m in processes.items()}
        load["pss_gib"] = sum(m["pss"] for m in processes.values()) / 2**30
        load["uss_gib"] = sum(m["uss"] for m in processes.values()) / 2**30
        after = f"after the load ({load['pss_at_end_gib']:.2f} GiB PSS as it ended)" if points else "before any load"
        log(
            f"serving stack {after}: PSS {load['pss_gib']:.2f} GiB, USS {load['uss_gib']:.2f} GiB "
            f"in {len(processes)} processes"
        )
        if interleaved:
            rounds, duration, requests = interleaved
            log(
                f"phase 3/3: Keras, pipeline, HTTP and gRPC interleaved: {requests} sequential calls of each, "
                f"then {rounds} rounds of {duration:.0f} s at 8"
            )
            arguments = ["paired", "--rounds", str(rounds), "--duration", str(duration), "--requests", str(requests)]
            load["paired"] = child(arguments, env, work / "paired.json")
        return load


STACKS = {"serving": "default precision", "serving_int8": "int8"}


def paired(result: dict[str, Any], stack: str = "serving") -> dict[str, Any]:
    return result[stack]["paired"]


def throughput_ratios(result: dict[str, Any], name: str, over: str = "keras", stack: str = "serving") -> list[float]:
    """Images/s of ``name`` against ``over`` in the same round, one per round."""
    rows, reference = paired(result, stack)["throughput"][name], paired(result, stack)["throughput"][over]
    return [row["images_per_s"] / other["images_per_s"] for row, other in zip(rows, reference, strict=True)]


def mean_throughput(result: dict[str, Any], name: str, stack: str = "serving") -> float:
    return statistics.fmean(row["images_per_s"] for row in paired(result, stack)["throughput"][name])


def cpu_class(result: dict[str, Any]) -> str:
    """bf16 where the CPU has AMX-BF16 or AVX512_BF16 (the auto precision's rule), else avx2."""
    return "bf16" if set(engines.BF16_FLAGS) & set(result["machine"]["cpu_flags"]) else "avx2"


def ratio_check(values: list[float], target: float, errors: int = 0) -> dict[str, Any]:
    mean = statistics.fmean(values)
    passed = mean >= target and not errors
    return {"value": mean, "rounds": values, "target": f">= {target:.2f}, no errors", "pass": passed}


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The targets, from the interleaved phases: each served figure against what ran beside it."""
    inproc, stack, sequential = result["in_process"], result["serving"], paired(result)["sequential"]
    checks: dict[str, Any] = {}
    for key, label in STACKS.items():
        if key not in result:
            continue
        target = TARGET_VS_TENSORFLOW["int8" if key == "serving_int8" else cpu_class(result)]
        prefix = "int8_" if key == "serving_int8" else ""
        for protocol in PROTOCOLS:
            errors = sum(row["errors"] for row in paired(result, key)["throughput"][protocol])
            checks[f"{prefix}{protocol}_c8_vs_tensorflow_b8"] = ratio_check(
                throughput_ratios(result, protocol, stack=key), target, errors
            )
            checks[f"{prefix}{protocol}_c8_vs_pipeline_b8"] = ratio_check(
                throughput_ratios(result, protocol, "pipeline", key), TARGETS["vs_pipeline_c8"], errors
            )
        checks[f"{prefix}pipeline_b8_vs_tensorflow_b8"] = {
            "value": statistics.fmean(ceiling := throughput_ratios(result, "pipeline", stack=key)),
            "rounds": ceiling,
            "target": f"(ceiling, {label}, reported)",
            "pass": None,
        }
    batch_errors = sum(row["errors"] for row in paired(result)["throughput"]["http_batch16"])
    checks["predict_batch16_vs_pipeline_b16"] = ratio_check(
        throughput_ratios(result, "http_batch16", "pipeline_b16"), TARGETS["batch16_vs_pipeline"], batch_errors
    )
    for protocol in PROTOCOLS:
        extra = sequential[protocol]["p50_ms"] - sequential["pipeline"]["p50_ms"]
        checks[f"{protocol}_sequential_p50_extra_ms"] = {
            "value": extra,
            "target": f"<= {TARGETS['sequential_p50_extra_ms']:.0f} over the pipeline",
            "pass": extra <= TARGETS["sequential_p50_extra_ms"],
        }
    checks["pss_gib"] = {
        "value": stack["pss_gib"],
        "target": f"<= {TARGETS['pss_gib']}",
        "pass": stack["pss_gib"] <= TARGETS["pss_gib"],
    }
    checks["cold_start_s"] = {
        "value": stack["cold_start_s"],
        "target": f"<= {TARGETS['cold_start_s']:.0f}",
        "pass": stack["cold_start_s"] <= TARGETS["cold_start_s"],
    }
    keras8 = [row["images_per_s"] for row in paired(result)["throughput"]["keras"]]
    checks["keras_drift_during_run"] = {
        "value": max(keras8) / min(keras8),
        "target": "(max/min, reported)",
        "pass": None,
    }
    checks["keras_fraction_of_matmul_peak"] = {
        "value": inproc["model_gflops_at_best"] / inproc["matmul_peak_gflops"],
        "target": "(reported)",
        "pass": None,
    }
    return checks


def row_line(name: str, row: dict[str, float]) -> str:
    return f"{name:<28}{row['images_per_s']:>10.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"


def cold_start_conditions(stack: dict[str, Any]) -> str:
    """What slowed the start, where the run recorded it (runs before it was recorded have no such keys)."""
    if "cold_start_disk_read_mib" not in stack:
        return ""
    return (
        f" ({stack['cold_start_disk_read_mib']:.0f} MiB read from disk, "
        f"{stack['cold_start_stolen_cores']:.2f} cores stolen by the hypervisor meanwhile)"
    )


def table(result: dict[str, Any]) -> str:
    inproc, stack = result["in_process"], result["serving"]
    lines = [
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"flags {' '.join(result['machine']['cpu_flags'])}; load average {result['load_average']}; "
        f"other processes used {result['other_processes_cores']} cores during the run"
        + (f", the hypervisor {result['stolen_cores']}" if "stolen_cores" in result else ""),
        f"matmul peak {inproc['matmul_peak_gflops']:.1f} GFLOP/s; model at batch {inproc['best_batch_size']}: "
        f"{inproc['model_gflops_at_best']:.1f} GFLOP/s",
        "",
        f"{'in process':<28}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    for batch, row in inproc["keras"].items():
        lines.append(row_line(f"Keras tf.function, batch {batch}", row))
    lines += ["", f"{'engines, images/s':<28}" + "".join(f"{f'batch {b}':>10}" for b in ENGINE_BATCH_SIZES)]
    for name, rows in inproc["engines"].items():
        lines.append(f"{name:<28}" + "".join(f"{rows[str(b)]['images_per_s']:>10.1f}" for b in ENGINE_BATCH_SIZES))
    lines += ["", f"{'served':<28}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"]
    for p in stack["points"]:
        lines.append(row_line(f"{p['protocol']}, concurrency {p['concurrency']}", p) + f"{p['errors']:>8}")
    sequential = paired(result)["sequential"]
    blocks = {f"interleaved, {sequential['keras']['requests']} calls each": sequential}
    if back_to_back := paired(result).get("sequential_back_to_back"):  # not in runs before 2026-12-04
        blocks[f"back to back, {BACK_TO_BACK_S:.0f} s each"] = back_to_back
    for title, rows in blocks.items():
        lines += ["", f"{title:<28}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}"]
        for name, row in rows.items():
            lines.append(row_line(f"{name}, {'concurrency' if name in PROTOCOLS else 'batch'} 1", row))
    for key, label in STACKS.items():
        if key not in result:
            continue
        rounds = paired(result, key)["rounds"]
        lines += ["", f"{f'interleaved, {label}, {rounds} rounds':<40}{'images/s':>10}  per round"]
        for name, rows in paired(result, key)["throughput"].items():
            each = " ".join(f"{row['images_per_s']:.2f}" for row in rows)
            unit = "concurrency 8" if name in PROTOCOLS else ("16 images" if name in BATCH_CONTENDERS else "batch 8")
            lines.append(f"{f'{name}, {unit}':<40}{mean_throughput(result, name, key):>10.2f}  {each}")
    lines += [
        "",
        f"cold start to ready {stack['cold_start_s']:.1f} s{cold_start_conditions(stack)}; first request "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in stack["first_request_ms"].items())
        + f"; serving stack PSS {stack['pss_gib']:.2f} GiB (USS {stack['uss_gib']:.2f} GiB; "
        + f"{stack['pss_at_end_gib']:.2f} GiB PSS as the load ended)",
        "",
        f"CPU class: {cpu_class(result)}; served at {result['serving']['engine']}",
        "",
        f"{'check':<36}{'value':>9}  {'target':<34}result",
    ]
    for name, check in result["checks"].items():
        verdict = {True: "PASS", False: "FAIL", None: ""}[check["pass"]]
        each = " (rounds: " + ", ".join(f"{v:.2f}" for v in check["rounds"]) + ")" if "rounds" in check else ""
        lines.append(f"{name:<36}{check['value']:>9.2f}  {check['target']:<34}{verdict}{each}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = result["serving"]
    sequential = paired(result)["sequential"]
    batch8, batch1_p50 = mean_throughput(result, "keras"), sequential["pipeline"]["p50_ms"]
    pipeline8 = mean_throughput(result, "pipeline")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for protocol, colour in zip(PROTOCOLS, ("tab:blue", "tab:orange"), strict=True):
        points = [p for p in stack["points"] if p["protocol"] == protocol]
        if not points:
            continue
        c = [p["concurrency"] for p in points]
        left.plot(c, [p["images_per_s"] for p in points], "o-", color=colour, label=f"served {protocol}")
        right.plot(c, [p["p50_ms"] for p in points], "o-", color=colour, label=f"{protocol} p50")
        right.plot(c, [p["p99_ms"] for p in points], "s--", color=colour, alpha=0.6, label=f"{protocol} p99")
        throughput8, p50 = mean_throughput(result, protocol), sequential[protocol]["p50_ms"]
        left.plot([8], [throughput8], "*", color=colour, markersize=13, label=f"{protocol}, interleaved")
        right.plot([1], [p50], "*", color=colour, markersize=13, label=f"{protocol} p50, interleaved")
    left.axhline(batch8, color="black", label="in-process TensorFlow fp32, batch 8 (interleaved)")
    left.axhline(pipeline8, color="green", linestyle="--", label="in-process pipeline, batch 8 (interleaved)")
    left.axhline(0.75 * pipeline8, color="green", linestyle=":", label="target: 0.75x the pipeline")
    left.set(xlabel="concurrent clients", ylabel="images/s", title="Throughput (closed loop)", ylim=(0, None))
    left.set_xticks(CONCURRENCY)
    left.legend(fontsize=8, loc="lower right")
    right.axhline(batch1_p50, color="green", label="in-process pipeline, batch 1 p50 (interleaved)")
    right.axhline(batch1_p50 + 4, color="green", linestyle=":", label="target: +4 ms (sequential)")
    right.set(xlabel="concurrent clients", ylabel="ms", title="Latency", ylim=(0, None))
    right.set_xticks(CONCURRENCY)
    right.legend(fontsize=8, loc="upper left")
    m = result["machine"]
    figure.suptitle(
        f"Inception v3 served ({stack['engine']}) vs in process - {m['cpu']}, {m['cores']} cores "
        f"(PSS {stack['pss_gib']:.2f} GiB, cold start {stack['cold_start_s']:.1f} s)",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main_run(args: argparse.Namespace) -> int:
    duration = args.duration or (5.0 if args.quick else 15.0)
    model_duration = 3.0 if args.quick else 8.0
    interleaved = (1, 3.0, 10) if args.quick else (args.rounds, 8.0, 80)
    # Sequential points first: after a high-concurrency phase the first lone request
    # waits once for batch-mates (inception_v3/batching.py; with batch_patience 0,
    # BentoML's own dispatcher keeps waiting), a wait the sequential figures should not carry.
    points = sorted(
        (
            LoadPoint(protocol, c, duration)
            for protocol in args.protocols
            for c in (args.concurrency or ((1, 8) if args.quick else CONCURRENCY))
        ),
        key=lambda point: point.concurrency,
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="inception-v3-bench-"))
    env = stack_environment(work, write_config_on_free_ports(work / "configuration.yaml", config_overrides(args.set)))
    started = time.monotonic()
    load_before = os.getloadavg()
    counters_before = machine_counters()
    if load_before[0] > 0.5:
        log(f"warning: load average {load_before[0]:.2f} before the run; other work will skew the numbers")
    try:
        log("phase 1/3: in-process TensorFlow (model save, matmul, Keras at each batch size)")
        inproc = child(["in-process", "--duration", str(model_duration)], env, work / "in_process.json")
        log(f"phase 2/3: serving stack, {len(points)} load points")
        stack = run_stack(env, work, points, interleaved)
        log("phase 3b: the serving stack with int8, interleaved phase only")
        int8_config = write_config_on_free_ports(
            work / "configuration-int8.yaml", {**config_overrides(args.set), "services.inception_v3.precision": "int8"}
        )
        stack_int8 = run_stack(stack_environment(work, int8_config), work, [], interleaved)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    own = os.times()
    during = counters_between(counters_before, machine_counters())
    other_cpu_s = during["busy_cpu_s"] - (own.user + own.system + own.children_user + own.children_system)
    elapsed = time.monotonic() - started
    result = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
        "load_average": [round(v, 2) for v in (*load_before, *os.getloadavg())],
        # CPU that processes outside this benchmark used during the run, in cores:
        # anything well above 0 means the figures are skewed.
        "other_processes_cores": round(max(0.0, other_cpu_s) / elapsed, 2),
        "stolen_cores": round(during["stolen_cpu_s"] / elapsed, 2),
        "options": {"quick": args.quick, "duration_s": duration, "config_overrides": args.set},
        "in_process": inproc,
        "serving": stack,
        "serving_int8": stack_int8,
    }
    result["checks"] = ratios(result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, png_path = RESULTS_DIR / f"bench-{stamp}.json", RESULTS_DIR / f"bench-{stamp}.png"
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, png_path)
    print(table(result))
    log(f"wrote {json_path} and {png_path}")
    if args.publish:
        DOCS_DIR.mkdir(exist_ok=True)
        shutil.copyfile(json_path, DOCS_DIR / "benchmark.json")
        shutil.copyfile(png_path, DOCS_DIR / "benchmark.png")
        log(f"copied to {DOCS_DIR / 'benchmark.json'} and {DOCS_DIR / 'benchmark.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase")
    parser.add_argument("--quick", action="store_true", help="short windows, concurrency 1 and 8 only")
    parser.add_argument("--duration", type=float, help="seconds per timed load point (default 15, quick 5)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS, help="of the load points")
    parser.add_argument("--concurrency", nargs="+", type=int, help=f"load points (default {CONCURRENCY})")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved phase at 8, 8 s per turn (quick: 1 of 3 s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="configuration override")
    parser.add_argument("--publish", action="store_true", help="copy the JSON and PNG to docs/")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model store and server log")
    in_process = sub.add_parser("in-process", help=argparse.SUPPRESS)
    in_process.add_argument("--duration", type=float, required=True)
    in_process.add_argument("--output", type=Path, required=True)
    interleaved = sub.add_parser("paired", help=argparse.SUPPRESS)
    interleaved.add_argument("--rounds", type=int, required=True)
    interleaved.add_argument("--duration", type=float, required=True)
    interleaved.add_argument("--requests", type=int, required=True)
    interleaved.add_argument("--output", type=Path, required=True)
    load = sub.add_parser("load", help=argparse.SUPPRESS)
    load.add_argument("--t0", type=float, required=True)
    load.add_argument("--points", type=json.loads, required=True)
    load.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.phase == "in-process":
        args.output.write_text(json.dumps(run_in_process(args.duration)))
        return 0
    if args.phase == "paired":
        args.output.write_text(json.dumps(run_paired(args.rounds, args.duration, args.requests)))
        return 0
    if args.phase == "load":
        points = [LoadPoint(**p) for p in args.points]
        args.output.write_text(json.dumps(run_load(args.t0, points, ready_timeout_s=240)))
        return 0
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
