"""The model worker behind BentoML's adaptive batching.

It loads the saved TensorFlow module, warms it up (so ``/readyz`` turns ready
only once the first request will be fast), has XLA compile the configured batch
sizes in the background (``model.CompiledModel``), and classifies batches of either kind of model input
(``preprocessing.model_input``): plain JPEG files, decoded by TensorFlow
(``classify_jpeg``), or uint8 pixels the API worker prepared with PIL
(``classify``). Both run the same model call, so XLA compiles each size once.
TensorFlow is imported here only, so API server processes stay small.
The API workers' side of the link is here too: ``classify_inputs`` calls the runner,
``connect_without_environment`` keeps BentoML's runner client off proxies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import aiohttp
import bentoml
import numpy as np
from bentoml._internal.runner.runner_handle.remote import RemoteRunnerClient

from .labels import NUM_CLASSES
from .memory import limit_malloc_arenas
from .preprocessing import INPUT_SIZE, ModelInput
from .weights import warning as weights_warning

logger = logging.getLogger(__name__)


MethodBatch = tuple[str, list[int], np.ndarray]
"""A runner method's name, the rows of the request it answers, and its batch."""


def batches_by_method(items: list[ModelInput]) -> list[MethodBatch]:
    """Model inputs grouped by the runner method that takes them (each method is its own batch queue)."""
    jpeg_rows = [i for i, item in enumerate(items) if isinstance(item, bytes)]
    pixel_rows = [i for i, item in enumerate(items) if not isinstance(item, bytes)]
    batches: list[MethodBatch] = []
    if jpeg_rows:
        batches.append(("classify_jpeg", jpeg_rows, np.array([items[i] for i in jpeg_rows], dtype=object)))
    if pixel_rows:
        batches.append(("classify", pixel_rows, np.stack([items[i] for i in pixel_rows])))
    return batches


def in_request_order(batches: list[MethodBatch], answers: list[np.ndarray]) -> np.ndarray:
    probabilities = np.empty((sum(len(rows) for _, rows, _ in batches), NUM_CLASSES), np.float32)
    for (_, rows, _), answer in zip(batches, answers, strict=True):
        probabilities[rows] = answer
    return probabilities


def connect_without_environment() -> None:
    """Make BentoML's runner client ignore proxy variables and ``~/.netrc``.

    It opens its aiohttp session with ``trust_env=True``, which on every call scans
    the environment for proxies and reads ``~/.netrc`` in a thread: 1.5-2 ms of an API
    worker's CPU per request on a 2-core box. The runner is this host's or this pod's
    own, so a proxy set for outside traffic must not apply to it anyway.
    """
    create_session = RemoteRunnerClient._client.fget

    def session(client: RemoteRunnerClient) -> aiohttp.ClientSession:
        created = create_session(client)
        created._trust_env = False
        return created

    RemoteRunnerClient._client = property(session)


async def classify_inputs(runner: bentoml.legacy.Runner, items: list[ModelInput]) -> np.ndarray:
    """(n, 1000) probabilities for model inputs of either kind, in their order; both methods run concurrently."""
    batches = batches_by_method(items)
    answers = await asyncio.gather(*(getattr(runner, method).async_run(batch) for method, _, batch in batches))
    return in_request_order(batches, list(answers))


def failed(probabilities: np.ndarray) -> np.ndarray:
    """Which rows of a ``classify_jpeg`` answer are images TensorFlow could not decode."""
    return np.isnan(probabilities).any(axis=1)


class InceptionV3Runnable(bentoml.legacy.Runnable):
    SUPPORTED_RESOURCES = ("nvidia.com/gpu", "cpu")
    SUPPORTS_CPU_MULTI_THREADING = True

    def __init__(self, bento_model: bentoml.Model, xla_batch_sizes: Sequence[int]) -> None:
        limit_malloc_arenas()
        import tensorflow as tf

        from .model import CompiledModel, decode_jpegs

        started = time.perf_counter()
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        self.model = bentoml.tensorflow.load_model(bento_model)
        self.decode_jpegs = decode_jpegs
        self.decode_error = tf.errors.InvalidArgumentError
        load_s = time.perf_counter() - started
        # One image through each path traces and compiles it; other batch sizes
        # measured no slower on first use, so warming them only delays readiness.
        blank = tf.io.encode_jpeg(tf.zeros((INPUT_SIZE, INPUT_SIZE, 3), tf.uint8)).numpy()
        self.classify_jpeg(np.array([blank], dtype=object))
        self.classify(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
        logger.info(
            "%s loaded in %.1f s, warmed up in %.1f s, on %s; XLA batch sizes: %s",
            bento_model.tag,
            load_s,
            time.perf_counter() - started - load_s,
            ", ".join(device.name for device in tf.config.list_logical_devices("GPU")) or "the CPU",
            ", ".join(map(str, xla_batch_sizes)) or "none",
        )
        if warning := weights_warning(bento_model.info.metadata):
            logger.warning("%s: %s", bento_model.tag, warning)
        if xla_batch_sizes:
            self.model = CompiledModel(self.model, xla_batch_sizes)

    def classify_in_process(self, items: list[ModelInput]) -> np.ndarray:
        """``classify_inputs`` without a server: the in-process reference for tests and the benchmark."""
        batches = batches_by_method(items)
        return in_request_order(batches, [getattr(self, method)(batch) for method, _, batch in batches])

    @bentoml.legacy.Runnable.method(batchable=True, batch_dim=0)
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 299, 299, 3) uint8 to (n, 1000) float32 softmax probabilities."""
        return self.model(pixels).numpy()

    @bentoml.legacy.Runnable.method(batchable=True, batch_dim=0)
    def classify_jpeg(self, jpegs: np.ndarray) -> np.ndarray:
        """(n,) JPEG files (bytes objects) to (n, 1000) probabilities.

        A file TensorFlow cannot decode must not fail the requests batched with it:
        the batch is retried one image at a time and that image's row is NaN.
        """
        try:
            pixels = self.decode_jpegs(jpegs)
        except self.decode_error:
            if len(jpegs) == 1:
                return np.full((1, NUM_CLASSES), np.nan, np.float32)
            return np.concatenate([self.classify_jpeg(jpegs[i : i + 1]) for i in range(len(jpegs))])
        return self.model(pixels).numpy()
