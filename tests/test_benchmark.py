"""The benchmark script's reporting, from the published run (no servers, no TensorFlow), and
its TensorFlow rows' precision.

The in-process pipeline it measures is ``prepare_image`` and ``InceptionV3Runnable.classify``,
the same code as the tests' ``reference_classify``; importing the script checks
that the names it uses still exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import bench
from inception_v3 import engines
from inception_v3.preprocessing import prepare_image
from tests.conftest import CAT_JPEG

PUBLISHED = json.loads((bench.DOCS_DIR / "benchmark.json").read_text())


def test_checks_are_recomputed_from_the_figures() -> None:
    checks = bench.ratios(PUBLISHED)
    assert checks.keys() == PUBLISHED["checks"].keys()
    for name, check in checks.items():
        assert check["value"] == PUBLISHED["checks"][name]["value"], name
        assert check["pass"] == PUBLISHED["checks"][name]["pass"], name


def test_table_and_plot(tmp_path: Path) -> None:
    text = bench.table(PUBLISHED)
    expected_lines = ("matmul peak", "engines, images/s", "openvino fp32", "pipeline, batch 8", "grpc, concurrency 8")
    for expected in (*expected_lines, "interleaved, int8", "predict_batch16_vs_pipeline_b16", "pss_gib", "CPU class"):
        assert expected in text
    bench.plot(PUBLISHED, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cold_start_is_shown_with_its_disk_reads_and_steal() -> None:
    before = bench.machine_counters()
    stack = {**PUBLISHED["serving"], "cold_start_disk_read_mib": 348.0, "cold_start_stolen_cores": 0.08}
    text = bench.table({**PUBLISHED, "serving": stack, "stolen_cores": 0.01})
    assert "(348 MiB read from disk, 0.08 cores stolen by the hypervisor meanwhile)" in text
    assert "the hypervisor 0.01" in text
    after = bench.machine_counters()
    assert 0 <= before["stolen_cpu_s"] <= after["stolen_cpu_s"]
    assert 0 < before["disk_read_mib"] <= after["disk_read_mib"]


def test_tensorflow_fp32_rows_stay_fp32_after_the_bf16_row(saved_model: str) -> None:
    """oneDNN's bf16 rewrite is process-wide: each TensorFlow row sets it for its own calls."""
    import bentoml
    import tensorflow as tf

    bento_model = bentoml.models.get(saved_model)
    choice = engines.choose("tensorflow", "fp32", bento_model.info.metadata["openvino_precisions"])
    pixels = np.stack([prepare_image(CAT_JPEG.read_bytes())] * 2)
    engine = engines.load(choice, bento_model)
    fp32 = engine(pixels)
    bf16 = bench.with_onednn_bf16(engine, True)(pixels)
    after = bench.with_onednn_bf16(engine, False)(pixels)
    np.testing.assert_array_equal(after, fp32)
    assert not tf.config.optimizer.get_experimental_options().get(bench.ONEDNN_BF16_OPTION, False)
    if any(flag in engines.cpu_flags() for flag in engines.BF16_FLAGS):
        assert not np.array_equal(bf16, fp32)


def test_back_to_back_calls_are_shown_after_the_interleaved_ones() -> None:
    paired = bench.paired(PUBLISHED)
    stack = {**PUBLISHED["serving"], "paired": {**paired, "sequential_back_to_back": paired["sequential"]}}
    text = bench.table({**PUBLISHED, "serving": stack})
    assert text.index("interleaved, ") < text.index(f"back to back, {bench.BACK_TO_BACK_S:.0f} s each")
