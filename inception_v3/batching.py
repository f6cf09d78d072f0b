"""Adaptive batching that waits, briefly, for the previous batch's requests to come back.

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
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing as t

from bentoml._internal.marshal import dispatcher
from bentoml._internal.server import runner_app

logger = logging.getLogger(__name__)


class PreviousBatchDispatcher(dispatcher.CorkDispatcher):
    patience: float = 0.15

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected_jobs = 1
        self.wait_until = 0.0  # the end of the wait for the previous batch's requests

    def queued_samples(self) -> int:
        return sum(self.get_batch_size(job.data) for job in self._queue)

    async def controller(self) -> None:
        while True:
            try:
                async with self._wake_event:
                    await self._wake_event.wait_for(self._queue.__len__)
                now = time.time()
                if now - self._queue[0].enqueue_time >= self.max_latency:
                    self._queue.popleft().future.cancel()  # answered 503 by the runner's fallback
                    continue
                if self._sema.is_locked() or (
                    len(self._queue) < self.expected_jobs
                    and now < self.wait_until
                    and self.queued_samples() < self.max_batch_size
                ):
                    await asyncio.sleep(self.TICKET_INTERVAL)
                    continue
                self._sema.acquire()
                self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))
            except Exception:
                logger.exception("Error processing batch requests")

    async def outbound_call(self, inputs_info: tuple[dispatcher.Job, ...], training: bool = False) -> None:
        started = time.time()
        await super().outbound_call(inputs_info, training)
        ended = time.time()
        self.wait_until = ended + self.patience * (ended - started)
        self.expected_jobs = len(inputs_info) + len(self._queue)


def install(patience: float) -> None:
    """Batch with ``PreviousBatchDispatcher`` (``patience`` > 0) or BentoML's own dispatcher (0)."""
    if patience > 0:
        PreviousBatchDispatcher.patience = patience
        runner_app.CorkDispatcher = PreviousBatchDispatcher
