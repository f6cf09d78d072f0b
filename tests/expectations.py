"""How a served answer is compared with the in-process one."""

from __future__ import annotations

import pytest


def assert_same_prediction(served: dict, expected: dict) -> None:
    """Same labels in the same order, scores equal to float32 precision, best first."""
    assert served["label"] == expected["label"]
    assert [e["label"] for e in served["top_k"]] == [e["label"] for e in expected["top_k"]]
    assert [e["score"] for e in served["top_k"]] == pytest.approx([e["score"] for e in expected["top_k"]], rel=1e-5)
    assert served["score"] == served["top_k"][0]["score"]
    scores = [e["score"] for e in served["top_k"]]
    assert scores == sorted(scores, reverse=True)
