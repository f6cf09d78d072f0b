"""The model worker behind BentoML's adaptive batching, and the API workers' link to it.

The runnable loads the engine ``engines.choose_here`` picks for this host (OpenVINO
on CPUs, TensorFlow on an NVIDIA GPU, unless the configuration names one), warms
it up (so ``/readyz`` turns ready only once the first request will be fast), says
in one log line and one metric what runs, and classifies batches of uint8 pixels.
Engines are imported here only, so API server processes stay small.
``connect_without_environment`` keeps BentoML's runner client off proxies.
"""

from __future__ import annotations

import logging
import time
import typing as t
from collections.abc import Sequence

import aiohttp
import bentoml
import numpy as np
from bentoml._internal.runner.runner_handle.remote import RemoteRunnerClient

from . import engines
from .observability import metrics
from .preprocessing import INPUT_SIZE

if t.TYPE_CHECKING:
    from .settings import Settings
from .weights import warning as weights_warning

logger = logging.getLogger(__name__)


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


def runnable_init_params(bento_model: bentoml.Model, settings: Settings) -> dict[str, t.Any]:
    """``InceptionV3Runnable``'s arguments from the configuration: for the service, the tests, the benchmark."""
    return {
        "bento_model": bento_model,
        "engine": settings.engine,
        "precision": settings.precision,
        "xla_batch_sizes": settings.xla_batch_sizes,
    }


class InceptionV3Runnable(bentoml.legacy.Runnable):
    SUPPORTED_RESOURCES = ("nvidia.com/gpu", "cpu")
    SUPPORTS_CPU_MULTI_THREADING = True

    def __init__(self, bento_model: bentoml.Model, engine: str, precision: str, xla_batch_sizes: Sequence[int]) -> None:
        started = time.perf_counter()
        self.choice = engines.choose_here(engine, precision, bento_model)
        options = {"xla_batch_sizes": xla_batch_sizes} if self.choice.engine == "tensorflow" else {}
        self.engine = engines.load(self.choice, bento_model, **options)
        load_s = time.perf_counter() - started
        self.engine(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
        self.engine_reported = False
        logger.info(
            "%s (weights: %s) runs on %s; loaded in %.1f s, warmed up in %.1f s",
            bento_model.tag,
            bento_model.info.metadata.get("weights", "unknown"),
            self.choice.describe(),
            load_s,
            time.perf_counter() - started - load_s,
        )
        if warning := weights_warning(bento_model.info.metadata):
            logger.warning("%s: %s", bento_model.tag, warning)

    @bentoml.legacy.Runnable.method(batchable=True, batch_dim=0)
    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 299, 299, 3) uint8 to (n, 1000) float32 softmax probabilities."""
        if not self.engine_reported:
            # On the first request, not at start: every BentoML server of the stack empties
            # the shared metrics folder when it starts, and the metric's file is made once.
            metrics().engine_in_use(self.choice)
            self.engine_reported = True
        return self.engine(pixels)
