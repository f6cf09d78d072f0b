"""The benchmark script's reporting, from the published run: no servers, no TensorFlow.

The in-process pipeline it measures is ``prepare_image`` and ``InceptionV3Runnable.classify``,
the same code as the tests' ``reference_classify``; importing the script checks
that the names it uses still exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench

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
