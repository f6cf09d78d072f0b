"""The model's versions, as TensorFlow Serving serves them: picked from the store, swapped live.

The runner holds ``ServedVersions``. It reads the model store (BentoML's, the Bento's
own, or ``services.inception_v3.model_store``, for instance a mounted volume) for
models named like ``model_tag``, keeps those the ``model_version_policy`` wants (the
newest N by ``serving_version``, or a list of numbers), and looks again every
``model_poll_s`` seconds or when asked (``refresh_soon``: SIGUSR1 to the runner
worker, which ``make reload`` sends through the launcher). A new version is loaded
and warmed beside the served ones; only then does it take requests that name no
version; the versions the policy no longer wants stop taking new requests, finish
those they hold, and are freed. A version that fails to load is marked END with
its error and the others go on serving; it is tried again once its files change.

States are TF Serving's: START (seen), LOADING, AVAILABLE, UNLOADING, END.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import signal
import threading
import time
import typing as t
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .memory import release_freed_memory

if t.TYPE_CHECKING:  # bentoml is imported where used: the settings (and the launcher) import this module
    import bentoml
    from bentoml._internal.models.model import ModelStore

    from .engines import Choice, Engine

logger = logging.getLogger(__name__)

RELOAD_SIGNAL = signal.SIGUSR1  # to a runner worker: look at the model store now (the launcher sends it)
DEFAULT = -1  # a request that names no version: the newest available one answers
NOT_SERVED = -1  # the answer for a request whose version is not available
MAX_DIGITS = 18  # a version number fits the runner's int64, and is never negative like those two
ENDED_KEPT = 8  # ended versions the status still lists
DRAIN_POLL_S = 0.01


def parse_number(text: str) -> int | None:
    """A version number (or any count) as a request writes it (a path segment, a query parameter,
    a header); None if it is not one.

    ASCII digits only: ``str.isdigit`` also takes "²", which ``int`` refuses; and at most
    ``MAX_DIGITS``, where ``int`` refuses more than 4300.
    """
    return int(text) if text.isascii() and text.isdigit() and len(text) <= MAX_DIGITS else None


def is_number(version: int) -> bool:
    """Whether ``version`` can be a version (gRPC's int64 fields may hold a negative one)."""
    return 0 <= version < 10**MAX_DIGITS


def requested(count: int, version: int | None = None) -> np.ndarray:
    """The runner's ``requested`` argument for ``count`` images: ``version``, or the newest."""
    return np.full(count, DEFAULT if version is None else version, np.int64)


class State(enum.Enum):
    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ``model_version_policy``: the ``latest`` N versions, or ``specific`` ones."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: dict[str, t.Any] | None) -> VersionPolicy:
        value = value or {"latest": 1}
        if set(value) == {"latest"} and isinstance(value["latest"], int) and value["latest"] >= 1:
            return cls(latest=value["latest"])
        if set(value) == {"specific"} and value["specific"] and all(isinstance(v, int) for v in value["specific"]):
            return cls(latest=None, specific=tuple(sorted(set(value["specific"]))))
        raise ValueError(f"model_version_policy: expected {{latest: N}} (N >= 1) or {{specific: [1, 2]}}: {value!r}")

    def select(self, models: t.Iterable[bentoml.Model]) -> dict[int, bentoml.Model]:
        """The wanted models by version number (the newest save of a number, if saved twice)."""
        by_number: dict[int, bentoml.Model] = {}
        for model in sorted(models, key=lambda m: m.info.creation_time):
            number = model.info.metadata.get("serving_version")
            if isinstance(number, int):
                by_number[number] = model
        if self.latest is not None:
            wanted = sorted(by_number, reverse=True)[: self.latest]
        else:
            wanted = [number for number in self.specific if number in by_number]
        return {number: by_number[number] for number in wanted}


def model_store(path: str | None) -> ModelStore:
    """The store to watch: ``path``, or the one BentoML uses here (a Bento's own when serving one)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    return ModelStore(path) if path else BentoMLContainer.model_store.get()


def models_named(store: ModelStore, tag: str) -> list[bentoml.Model]:
    """Every model of ``tag``'s name; only that one if the tag names a version other than latest."""
    import bentoml

    name, _, version = tag.partition(":")
    if version and version != "latest":
        return [store.get(tag)]
    try:
        return store.list(name)
    except bentoml.exceptions.NotFound:
        return []


@dataclass
class Version:
    number: int
    model: bentoml.Model
    state: State = State.START
    error: str = ""
    engine: Engine | None = None
    choice: Choice | None = None  # what runs it, once loaded
    in_flight: int = 0

    def status(self) -> dict[str, t.Any]:
        return {
            "version": self.number,
            "state": self.state.value,
            "error": self.error,
            "tag": str(self.model.tag),
            "metadata": dict(self.model.info.metadata),
            "engine": self.choice.as_dict() if self.choice else None,
        }


Loader = Callable[["bentoml.Model"], tuple["Engine", "Choice"]]


FilesSignature = tuple[tuple[str, int, int], ...]


def files_signature(model: bentoml.Model) -> FilesSignature:
    """Each file of a model's folder: its path, size and modification time."""
    root = Path(model.path)
    found = []
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):  # removed while listed
            if path.is_file():
                stat = path.stat()
                found.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


class ServedVersions:
    """The versions a runner serves, and their swaps. Thread-safe: batches run while versions load."""

    def __init__(self, list_models: Callable[[], list[bentoml.Model]], policy: VersionPolicy, load: Loader) -> None:
        self.list_models = list_models
        self.policy = policy
        self.load = load
        self.versions: dict[int, Version] = {}
        self.ended: list[Version] = []
        self.failed_files: dict[str, FilesSignature] = {}  # by tag: what the model's folder held when it failed
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.refreshing = threading.Lock()

    # --- serving -------------------------------------------------------------------------------

    def default_number(self) -> int | None:
        available = [v.number for v in self.versions.values() if v.state is State.AVAILABLE]
        return max(available, default=None)

    @contextlib.contextmanager
    def use(self, requested: int) -> Iterator[Version | None]:
        """The version that answers ``requested`` (``DEFAULT``: the newest available), held while in use."""
        with self.lock:
            number = self.default_number() if requested == DEFAULT else requested
            version = self.versions.get(number) if number is not None else None
            if version is None or version.state is not State.AVAILABLE:
                version = None
            else:
                version.in_flight += 1
        try:
            yield version
        finally:
            if version is not None:
                with self.lock:
                    version.in_flight -= 1

    def status(self) -> list[dict[str, t.Any]]:
        with self.lock:
            current = sorted(self.versions.values(), key=lambda v: v.number, reverse=True)
            ended = [v for v in reversed(self.ended) if v.number not in self.versions]  # not served again since
            return [v.status() for v in [*current, *ended]]

    # --- loading and unloading -----------------------------------------------------------------

    def refresh(self) -> None:
        """One look at the store: load what the policy newly wants, then unload what it no longer does."""
        with self.refreshing:
            wanted = self.policy.select(self.list_models())
            for number, model in sorted(wanted.items()):
                known = self.versions.get(number)
                if known is None and self.unchanged_since_it_failed(model):
                    continue
                if known is not None:
                    if known.model.tag != model.tag:
                        logger.warning(
                            "version %d was saved again (%s); the loaded %s goes on serving: "
                            "save under a new version number to replace it",
                            number,
                            model.tag,
                            known.model.tag,
                        )
                    continue
                self.load_version(Version(number, model))
            if not any(v.state is State.AVAILABLE for v in self.versions.values() if v.number in wanted):
                return  # nothing wanted could load: the old versions go on serving
            for number in [n for n in self.versions if n not in wanted]:
                self.unload_version(self.versions[number])

    def unchanged_since_it_failed(self, model: bentoml.Model) -> bool:
        """A model that failed to load is tried again only once its files change.

        BentoML's ``ModelStore.register`` copies a saved model into its store folder in
        place, so a look at the store can list a model that ``save_model.py`` is still
        copying in (measured: "Incorrect weights in bin file!" from a half-copied IR);
        its next look finds the files changed and loads it whole. A model that is broken
        as saved is not loaded again, and keeps its error.
        """
        failed = self.failed_files.get(str(model.tag))
        return failed is not None and failed == files_signature(model)

    def load_version(self, version: Version) -> None:
        with self.lock:
            self.versions[version.number] = version
            version.state = State.LOADING
        files = files_signature(version.model)  # before loading: a copy that ends during the load is a change
        if str(version.model.tag) in self.failed_files:
            logger.info(
                "version %d (%s) changed since it failed to load: loading it again", version.number, version.model.tag
            )
        started = time.perf_counter()
        try:
            engine, choice = self.load(version.model)
        except Exception as error:  # any failure to load or warm keeps the current versions serving
            logger.exception(
                "version %d (%s) failed to load; the others go on serving", version.number, version.model.tag
            )
            with self.lock:
                del self.versions[version.number]
                version.state, version.error = State.END, f"{type(error).__name__}: {error}"
                self.failed_files[str(version.model.tag)] = files
                self.keep_ended(version)
            return
        with self.lock:
            version.engine, version.choice = engine, choice
            version.state = State.AVAILABLE
        logger.info(
            "version %d (%s) is available after %.1f s; requests that name no version go to version %s",
            version.number,
            version.model.tag,
            time.perf_counter() - started,
            self.default_number(),
        )

    def unload_version(self, version: Version) -> None:
        with self.lock:
            version.state = State.UNLOADING
        while version.in_flight:  # requests it holds finish on it
            time.sleep(DRAIN_POLL_S)
        with self.lock:
            del self.versions[version.number]
            version.engine = None
            version.state = State.END
            self.keep_ended(version)
        gc.collect()
        release_freed_memory()
        logger.info("version %d (%s) unloaded", version.number, version.model.tag)

    def keep_ended(self, version: Version) -> None:
        others = [v for v in self.ended if v.number != version.number]
        self.ended = [*others[-(ENDED_KEPT - 1) :], version]

    # --- watching ------------------------------------------------------------------------------

    def refresh_soon(self) -> None:
        """Look at the store now (from a signal handler: only sets an event)."""
        self.wake.set()

    def watch(self, poll_s: float) -> threading.Thread:
        """Refresh every ``poll_s`` seconds (0: only when woken), in a daemon thread."""

        def loop() -> None:
            while True:
                self.wake.wait(poll_s or None)
                self.wake.clear()
                try:
                    self.refresh()
                except Exception:  # an unreadable store: say so, keep serving, look again later
                    logger.exception("looking for new versions failed")

        thread = threading.Thread(target=loop, name="model-versions", daemon=True)
        thread.start()
        return thread
