"""The model worker behind BentoML's adaptive batching.

It loads the saved TensorFlow module, warms it up for every batch size the
dispatcher may send (so ``/readyz`` turns ready only once the first request will
be fast), and classifies uint8 pixel batches. TensorFlow is imported here only,
so API server processes stay small.
"""

from __future__ import annotations

import logging

import bentoml
import numpy as np

from .preprocessing import INPUT_SIZE

logger = logging.getLogger(__name__)


class InceptionV3Runnable(bentoml.legacy.Runnable):
    SUPPORTED_RESOURCES = ("nvidia.com/gpu", "cpu")
    SUPPORTS_CPU_MULTI_THREADING = True

    def __init__(self, bento_model: bentoml.Model, warmup_batch_sizes: tuple[int, ...]) -> None:
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        self.model = bentoml.tensorflow.load_model(bento_model)
        for batch_size in warmup_batch_sizes:
            self.model(np.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
        logger.info("%s warmed up for batch sizes %s", bento_model.tag, warmup_batch_sizes)

    @bentoml.legacy.Runnable.method(batchable=True, batch_dim=0)
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 299, 299, 3) uint8 to (n, 1000) float32 softmax probabilities."""
        return self.model(pixels).numpy()
