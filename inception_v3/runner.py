"""The model worker behind BentoML's adaptive batching, and the API workers' link to it.

The runnable holds the model's served versions (``versions``: the policy, the store
watch, the swaps). It loads each with the engine ``engines.choose_here`` picks for
this host (OpenVINO on CPUs, TensorFlow on an NVIDIA GPU, unless the configuration
names one), warms it up (so ``/readyz`` turns ready only once the first request will
be fast, and a new version takes requests only once it is warm), says in one log
line and one metric what runs, and classifies batches of uint8 pixels, each image on
the version its request asked for. Engines are imported here only, so API server
processes stay small. ``connect_without_environment`` keeps BentoML's runner client
off proxies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
import typing as t
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import bentoml
import numpy as np
from bentoml._internal.runner.runner_handle.remote import RemoteRunnerClient

from . import engines, versions
from .labels import NUM_CLASSES
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


def runnable_init_params(bento_model: bentoml.Model, settings: Settings, watch: bool = False) -> dict[str, t.Any]:
    """``InceptionV3Runnable``'s arguments from the configuration: for the service, the tests, the benchmark.

    ``watch``: serve the versions of the store the policy wants, and pick up new ones
    (the service); else serve ``bento_model`` alone (in-process callers).
    """
    store_watch = StoreWatch(settings.model_store, settings.model_tag, settings.version_policy, settings.model_poll_s)
    return {
        "bento_model": bento_model,
        "engine": settings.engine,
        "precision": settings.precision,
        "xla_batch_sizes": settings.xla_batch_sizes,
        "openvino_batch_limit": settings.openvino_batch_limit,
        "store_watch": store_watch if watch else None,
    }


@dataclass(frozen=True)
class StoreWatch:
    store_path: str | None  # None: the store BentoML uses here
    model_tag: str
    policy: versions.VersionPolicy
    poll_s: float  # 0: only when signalled (versions.RELOAD_SIGNAL)


class InceptionV3Runnable(bentoml.legacy.Runnable):
    SUPPORTED_RESOURCES = ("nvidia.com/gpu", "cpu")
    SUPPORTS_CPU_MULTI_THREADING = True

    def __init__(
        self,
        bento_model: bentoml.Model,
        engine: str,
        precision: str,
        xla_batch_sizes: Sequence[int],
        openvino_batch_limit: int | str = 0,
        store_watch: StoreWatch | None = None,
    ) -> None:
        self.engine_setting, self.precision_setting = engine, precision
        self.engine_options = {
            "tensorflow": {"xla_batch_sizes": xla_batch_sizes},
            "openvino": {"batch_limit": openvino_batch_limit},
        }
        if store_watch is None:
            policy, list_models = versions.VersionPolicy(latest=1), lambda: [bento_model]
        else:
            store = versions.model_store(store_watch.store_path)
            policy = store_watch.policy
            list_models = functools.partial(versions.models_named, store, store_watch.model_tag)
        self.versions = versions.ServedVersions(list_models, policy, self.load_on_start_thread)
        self.start_thread = threading.current_thread()
        try:
            self.start_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.start_loop = None
        self.versions.refresh()
        if self.versions.default_number() is None:
            errors = "; ".join(f"version {v['version']}: {v['error']}" for v in self.versions.status()) or "none found"
            raise RuntimeError(f"no version of {bento_model.tag.name} could be served ({errors})")
        self.engine_reported = False
        if store_watch is not None:
            if threading.current_thread() is threading.main_thread():  # a worker's start (runner or embedded)
                signal.signal(versions.RELOAD_SIGNAL, lambda _signum, _frame: self.versions.refresh_soon())
            self.versions.watch(store_watch.poll_s)

    def load_on_start_thread(self, bento_model: bentoml.Model) -> tuple[engines.Engine, engines.Choice]:
        """Load on the thread (and event loop) that loaded the first version: a runner worker's main thread.

        Measured here (OpenVINO 2026.4, AMX Xeon): after a model was compiled on
        another thread, the next signal to the worker (SIGTERM, SIGUSR1) killed it
        with a kernel SIGSEGV while it set up the signal frame; compiled on the main
        thread, no signal did. The price: runner calls wait while a version loads
        (0.2-0.4 s for OpenVINO from its IR; see benchmarks/swaps.py).
        """
        if self.start_loop is None or threading.current_thread() is self.start_thread:
            return self.load(bento_model)

        async def load() -> tuple[engines.Engine, engines.Choice]:
            return self.load(bento_model)

        return asyncio.run_coroutine_threadsafe(load(), self.start_loop).result()

    def load(self, bento_model: bentoml.Model) -> tuple[engines.Engine, engines.Choice]:
        """Load and warm one version (so it answers its first request at full speed)."""
        started = time.perf_counter()
        choice = engines.choose_here(self.engine_setting, self.precision_setting, bento_model)
        engine = engines.load(choice, bento_model, **self.engine_options[choice.engine])
        load_s = time.perf_counter() - started
        engine(np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
        logger.info(
            "%s (version %s, weights: %s) runs on %s; loaded in %.1f s, warmed up in %.1f s",
            bento_model.tag,
            bento_model.info.metadata.get("serving_version"),
            bento_model.info.metadata.get("weights", "unknown"),
            choice.describe(),
            load_s,
            time.perf_counter() - started - load_s,
        )
        if warning := weights_warning(bento_model.info.metadata):
            logger.warning("%s: %s", bento_model.tag, warning)
        return engine, choice

    @property
    def engine(self) -> engines.Engine:
        """The engine of the version that answers requests naming none."""
        with self.versions.use(versions.DEFAULT) as version:
            return version.engine

    @bentoml.legacy.Runnable.method(batchable=True, batch_dim=0)
    def classify(self, pixels: np.ndarray, requested: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 299, 299, 3) uint8 and (n,) requested versions to (n, 1000) float32 softmax
        probabilities and (n,) the versions that answered (``versions.NOT_SERVED``: none could)."""
        probabilities = np.zeros((len(pixels), NUM_CLASSES), np.float32)
        answered = np.full(len(pixels), versions.NOT_SERVED, np.int64)
        for number in np.unique(requested):
            rows = slice(None) if len(requested) and (requested == number).all() else requested == number
            with self.versions.use(int(number)) as version:
                if version is None:
                    continue
                if not self.engine_reported:
                    # On the first request, not at start: every BentoML server of the stack empties
                    # the shared metrics folder when it starts, and the metric's file is made once.
                    metrics().engine_in_use(version.choice)
                    self.engine_reported = True
                probabilities[rows] = version.engine(pixels[rows])
                answered[rows] = version.number
        return probabilities, answered

    @bentoml.legacy.Runnable.method(batchable=False)
    def model_status(self) -> list[dict[str, t.Any]]:
        """Every version's state (TF Serving's), error and metadata, newest first."""
        return self.versions.status()
