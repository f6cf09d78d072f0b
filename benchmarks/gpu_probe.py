"""Inception v3 on a GPU machine that has no TensorFlow: Keras 3 on its JAX backend.

The GPU machines lent to this project cannot install TensorFlow (no package index
is reachable there, and TensorFlow 2.20 with its CUDA 12 libraries is far larger
than what can be carried to them), so ``benchmarks/bench.py`` cannot run there.
This probe measures the model there: the same Keras ``InceptionV3`` architecture
(Keras 3, the version TensorFlow 2.20 uses) compiled by XLA through JAX, in
float32 and bfloat16 (mixed precision), at several batch sizes: images/s and p50
latency, the host-to-device copy and the answer's way back included. It needs
only Keras and JAX (no BentoML, no TensorFlow).

    KERAS_BACKEND=jax python -m benchmarks.gpu_probe --output probe.json

Any Keras backend runs it (``KERAS_BACKEND=tensorflow`` checks it on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import GFLOP_PER_IMAGE, batch_figures, timed_calls

INPUT_SIZE = 299  # preprocessing.INPUT_SIZE, not imported: that module needs BentoML


def model_figures(precision: str, batch_sizes: list[int], duration_s: float) -> dict[str, Any]:
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    keras.utils.set_random_seed(7)
    model = keras.applications.InceptionV3(weights=None)
    rows: dict[str, Any] = {}
    for batch_size in batch_sizes:
        pixels = np.random.default_rng(0).uniform(-1, 1, (batch_size, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32)
        latencies = timed_calls(lambda pixels=pixels: model.predict_on_batch(pixels), duration_s)
        rows[str(batch_size)] = batch_figures(batch_size, latencies)
        print(f"{precision}, batch {batch_size}: {rows[str(batch_size)]['images_per_s']:.1f} img/s", flush=True)
    best = max(rows.values(), key=lambda row: row["images_per_s"])
    return {"batches": rows, "tflop_s_at_best": best["images_per_s"] * GFLOP_PER_IMAGE / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per batch size")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    import keras

    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    result: dict[str, Any] = {
        "machine": {"gpu": gpu or None, "cpu_cores": os.cpu_count(), "python": platform.python_version()},
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "model": {p: model_figures(p, args.batch_sizes, args.duration) for p in ("float32", "bfloat16")},
    }
    if result["backend"] == "jax":
        import jax

        result["jax"] = jax.__version__
        result["devices"] = [str(device) for device in jax.devices()]
    print(json.dumps(result, indent=2))
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
