"""ImageNet labels and top-k.

The label file is the reference's: 1001 names with "background" first. Keras'
InceptionV3 has 1000 outputs, so output ``i`` is label ``i + 1``. ``save_model.py``
stores the 1000 class names with the model; the service reads them from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABEL_FILE = Path(__file__).with_name("image_net_labels.json")
NUM_CLASSES = 1000


def load_class_names(path: Path = LABEL_FILE) -> list[str]:
    names = json.loads(path.read_text())
    if len(names) != NUM_CLASSES + 1 or names[0] != "background":
        raise ValueError(f"{path}: expected 1001 labels starting with 'background'")
    return names[1:]


def top_k_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` most probable classes, best first."""
    k = max(1, min(k, len(probabilities)))
    best = np.argpartition(-probabilities, k - 1)[:k]
    return best[np.argsort(-probabilities[best], kind="stable")]


def top_k(probabilities: np.ndarray, class_names: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes, best first."""
    return [(class_names[i], float(probabilities[i])) for i in top_k_indices(probabilities, k)]
