"""TensorFlow: the saved ``tf.Module`` (``model.InceptionV3Serving``); the engine for NVIDIA GPUs.

On a GPU, TensorFlow grows its memory as needed instead of taking the whole card.
``xla_batch_sizes`` has XLA compile those batch sizes in the background
(``CompiledModel``); on the CPU that measured 6% faster on an AVX2 EPYC and slower
on an AVX-512 Xeon, so it is off by default and a choice per host.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from ..memory import limit_malloc_arenas, release_freed_memory
from ..model import PIXELS_SPEC
from ..preprocessing import INPUT_SIZE

if t.TYPE_CHECKING:
    import bentoml

logger = logging.getLogger(__name__)


class CompiledModel:
    """The serving model, compiled by XLA for some batch sizes.

    XLA compiles each batch size on its own, in 4-6 s of a core, and each compiled
    size holds 20-35 MiB (the first about 100 MiB). So a background thread compiles
    the configured sizes after the runner is up, and the plain graph answers every
    other size, and these until they are compiled.
    """

    def __init__(self, model: tf.Module, batch_sizes: Iterable[int]) -> None:
        self.plain = model
        self.compiled = tf.function(lambda pixels: model(pixels), jit_compile=True, input_signature=[PIXELS_SPEC])
        self.ready: set[int] = set()
        self.compiler = threading.Thread(target=self.compile, args=(tuple(batch_sizes),), name="xla", daemon=True)
        self.compiler.start()

    def __call__(self, pixels: tf.Tensor | np.ndarray) -> tf.Tensor:
        return (self.compiled if len(pixels) in self.ready else self.plain)(pixels)

    def compile(self, batch_sizes: tuple[int, ...]) -> None:
        for batch_size in batch_sizes:
            started = time.perf_counter()
            try:
                self.compiled(np.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
            except Exception:
                logger.exception("XLA could not compile batch size %d; the plain graph serves it", batch_size)
                continue
            self.ready.add(batch_size)
            logger.info("XLA compiled the model for batch size %d in %.1f s", batch_size, time.perf_counter() - started)
        release_freed_memory()


class TensorFlowEngine:
    name = "tensorflow"
    precision = "fp32"

    def __init__(self, model: tf.Module | CompiledModel) -> None:
        self.model = model

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.model(pixels).numpy()


def load(bento_model: bentoml.Model, precision: str, xla_batch_sizes: Iterable[int] = ()) -> TensorFlowEngine:
    limit_malloc_arenas()  # before TensorFlow starts its thread pools (memory.py)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    model = tf.saved_model.load(bento_model.path)
    sizes = tuple(xla_batch_sizes)
    return TensorFlowEngine(CompiledModel(model, sizes) if sizes else model)
