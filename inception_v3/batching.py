"""Adaptive batching that waits, briefly, for requests on their way to the next batch.

BentoML's dispatcher (``CorkDispatcher``, one per runner method) holds a request
back only while its learned average queueing time is long; with a compute-bound
model and clients that send their next image as soon as they have an answer, it
settles into a batch of one followed by a batch of all the others (measured at
concurrency 8: 25 batches of 1 and 24 of 5-8 in 25 s). A batch of one uses the
CPU worst.

``PreviousBatchDispatcher`` keeps BentoML's queue, batch assembly, runner calls
and ``max_latency_ms`` (a request queued that long gets 503), and changes only
when a batch leaves: once the runner is free, it waits until the requests of the
previous batch are back in the queue (as many requests as that batch held, plus
those that were already queued when it ended), or for ``patience`` times the
previous batch's compute time, whichever comes first. Alone, a client's requests
go at once (the previous batch held one); clients that come back together are
batched together again.

BentoML 1.4 has no setting for the dispatcher; the runner server builds it from
``bentoml._internal.server.runner_app.CorkDispatcher``, which ``install`` replaces.
``service.py`` calls it, so it runs in every process that loads the service, and
in the runner server before that builds its app; only the runner builds dispatchers.

BentoML's embedded runner (``runner: embedded``) batches nothing: its handle runs
each call alone, one at a time. ``install`` gives its batchable methods a dispatcher
in the API server itself (``EmbeddedBatches``): concurrent requests to one door share
an engine call, as they share a batch in the runner, and the batch sizes go to the
runner's histogram, ``bentoml_runner_adaptive_batch_size``. There the requests on
their way are known rather than guessed: the next batch waits for the images the API
server is decoding. Measured on a 2-core AMX Xeon (OpenVINO bf16, HTTP): in closed
loops at concurrency 8 it matched or beat the previous-batch rule (0.96-1.20x), and
under open-loop (Poisson) traffic it kept the latency down, where the previous-batch
rule with the same patience waits for requests that a client never sends back
(at 60 requests/s, p50 25-34 ms, against 130-161 ms; 33-35 ms at patience 0.15).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import typing as t

import numpy as np
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.context import server_context
from bentoml._internal.marshal import dispatcher
from bentoml._internal.runner.runner_handle.local import LocalRunnerRef
from bentoml._internal.server import runner_app
from bentoml._internal.utils.metrics import exponential_buckets
from bentoml.exceptions import ServiceUnavailable

from . import preprocessing

if t.TYPE_CHECKING:
    from bentoml._internal.runner.runner import RunnerMethod

logger = logging.getLogger(__name__)


class PreviousBatchDispatcher(dispatcher.CorkDispatcher):
    patience: float = 0.15

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected_jobs = 1
        self.wait_until = 0.0  # the end of the wait for the previous batch's requests
        # Set by whatever can change the controller's decision, which waits for it (or for its next
        # deadline) instead of BentoML's 1 ms polling: the poll let 1.1 ms pass between a batch's
        # last request and its start (2-core AMD EPYC, OpenVINO bf16, HTTP at concurrency 8).
        self.changed = asyncio.Event()

    def queued_samples(self) -> int:
        return sum(self.get_batch_size(job.data) for job in self._queue)

    async def controller(self) -> None:
        while True:
            try:
                self.changed.clear()
                if not self._queue:
                    await self.changed.wait()
                    continue
                now = time.time()
                expires = self._queue[0].enqueue_time + self.max_latency
                if now >= expires:
                    self._queue.popleft().future.cancel()  # answered 503 by the runner's fallback
                    continue
                if self._sema.is_locked():
                    await self.until_changed(expires - now)
                    continue
                if now < self.wait_until and self.queued_samples() < self.max_batch_size and self.more_on_the_way():
                    await self.until_changed(min(expires, self.wait_until) - now)
                    continue
                self._sema.acquire()
                self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))
            except Exception:
                logger.exception("Error processing batch requests")

    async def until_changed(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.changed.wait()

    def more_on_the_way(self) -> bool:
        """Whether requests for the next batch are still coming: those of the previous batch."""
        return len(self._queue) < self.expected_jobs

    async def inbound_call(self, data: t.Any) -> t.Any:
        self.changed.set()  # BentoML's inbound_call queues the request before it first awaits
        return await super().inbound_call(data)

    async def outbound_call(self, inputs_info: tuple[dispatcher.Job, ...], training: bool = False) -> None:
        started = time.time()
        await super().outbound_call(inputs_info, training)
        ended = time.time()
        self.wait_until = ended + self.patience * (ended - started)
        self.expected_jobs = len(inputs_info) + len(self._queue)
        self.changed.set()


Arguments = tuple[np.ndarray, ...]  # one call's positional arguments, each batched on axis 0


class EmbeddedBatches(PreviousBatchDispatcher):
    """Batches of an embedded runner's calls, each call's arrays whole (at least one call a batch).

    In the API server itself, the requests on their way are known: those whose images
    are being decoded (``preprocessing.decoding``). The next batch waits for them, at
    most ``patience`` times the previous batch's compute time.
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        preprocessing.decodes_ended.add(self.changed)

    def more_on_the_way(self) -> bool:
        return preprocessing.decoding > 0

    def _get_inputs(self, num_batches: int | None = None) -> t.Iterator[dispatcher.Job]:
        samples = 0
        while self._queue and (
            samples == 0 or samples + self.get_batch_size(self._queue[0].data) <= self.max_batch_size
        ):
            job = self._queue.popleft()
            samples += self.get_batch_size(job.data)
            yield job


def overloaded() -> t.NoReturn:
    raise ServiceUnavailable("the model is overloaded: a request waited longer than runners.batching.max_latency_ms")


run_alone = LocalRunnerRef.async_run_method  # BentoML's: each call by itself


@functools.cache
def batch_sizes() -> t.Any:
    """The runner server's histogram of batch sizes (``runner_app``), for the batches of an embedded runner."""
    max_batch_size = BentoMLContainer.runners_config.get()["batching"]["max_batch_size"]
    return BentoMLContainer.metrics_client.get().Histogram(
        namespace="bentoml_runner",
        name="adaptive_batch_size",
        documentation="Runner adaptive batch size",
        labelnames=["runner_name", "worker_index", "method_name", "service_version", "service_name"],
        buckets=exponential_buckets(1, 2, max_batch_size),
    )


async def run_batch(handle: LocalRunnerRef, method: RunnerMethod, calls: tuple[Arguments, ...]) -> list[t.Any]:
    """One call of ``method`` for several calls' arguments, its outputs split back by call."""
    batch_sizes().labels(
        runner_name=method.runner.name,
        worker_index=server_context.worker_index,
        method_name=method.name,
        service_version=server_context.bento_version,
        service_name=server_context.bento_name,
    ).observe(len(calls))
    arguments = [np.concatenate(arrays) for arrays in zip(*calls, strict=True)]
    outputs = await run_alone(handle, method, *arguments)
    ends = np.cumsum([len(call[0]) for call in calls])[:-1]
    if isinstance(outputs, tuple):
        return list(zip(*(np.split(output, ends) for output in outputs), strict=True))
    return np.split(outputs, ends)


async def run_batched(handle: LocalRunnerRef, method: RunnerMethod, *args: t.Any, **kwargs: t.Any) -> t.Any:
    """``LocalRunnerRef.async_run_method`` through an ``EmbeddedBatches`` per batchable method of an
    embedded runner (a runner server's handle is a ``LocalRunnerRef`` too, behind its own dispatcher)."""
    if (
        not method.runner.embedded
        or kwargs
        or not method.config.batchable
        or method.max_batch_size <= 1
        or method.config.batch_dim != (0, 0)
    ):
        return await run_alone(handle, method, *args, **kwargs)
    batches: dict[str, t.Callable[[Arguments], t.Awaitable[t.Any]]] = handle.__dict__.setdefault("batches", {})
    if method.name not in batches:
        batches[method.name] = EmbeddedBatches(
            method.max_latency_ms,
            method.max_batch_size,
            fallback=overloaded,
            get_batch_size=lambda call: len(call[0]),
        )(functools.partial(run_batch, handle, method))
    return await batches[method.name](args)


def install(patience: float, embedded_patience: float) -> None:
    """Batch with ``PreviousBatchDispatcher`` (``patience`` > 0) or BentoML's own dispatcher (0) in the
    runner, and with ``EmbeddedBatches`` in an embedded runner (``embedded_patience`` 0: whatever is
    queued when the model is free)."""
    PreviousBatchDispatcher.patience = patience
    EmbeddedBatches.patience = embedded_patience
    if patience > 0:
        runner_app.CorkDispatcher = PreviousBatchDispatcher
    LocalRunnerRef.async_run_method = run_batched
