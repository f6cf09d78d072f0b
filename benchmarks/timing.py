"""Timing helpers of the benchmark and the GPU probe.

Standard library only: the probe runs on machines without BentoML or TensorFlow.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

GFLOP_PER_IMAGE = 11.5  # Inception v3 at 299x299, forward pass (about 5.7 G multiply-adds)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in latencies_s]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)}


def timed_calls(call: Callable[[], object], duration_s: float, warmup_calls: int = 3) -> list[float]:
    """Warm up, then call back to back for ``duration_s`` (at least 3 calls); each call's seconds."""
    for _ in range(warmup_calls):
        call()
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline or len(latencies) < 3:
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return latencies


def batch_figures(batch_size: int, latencies_s: list[float]) -> dict[str, float]:
    """Throughput and latency of back-to-back calls that each take ``batch_size`` images."""
    return {"images_per_s": batch_size * len(latencies_s) / sum(latencies_s), **latency_summary(latencies_s)}
