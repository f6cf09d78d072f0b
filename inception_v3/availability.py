"""Whether the runner answers, as an API server sees it: refuse at once while it does not.

When the runner is gone (killed, restarting, loading the model) BentoML's
runner client fails each call with a connection error (a 500), or, while a new
runner's socket is open but its worker not yet serving, waits in the socket's
backlog until the model is loaded. ``RunnerWatch`` asks the runners' ``/readyz``
every ``PERIOD_S`` (a local runner is always ready) and the guards refuse calls
while the last answer was no, 503 / UNAVAILABLE with a retry hint, and say not ready on
``/readyz`` and gRPC health; ``runner_reachable`` turns the connection errors
of calls already on their way into the same 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing as t
from collections.abc import AsyncIterator

import aiohttp
from bentoml.exceptions import RemoteException, ServiceUnavailable

if t.TYPE_CHECKING:
    import bentoml

PERIOD_S = 0.5
# A runner busy with batches answers its /readyz late (BentoML's 1 s probe timeout failed under
# load on 2 cores): until a probe fails, the previous answer stands. One waiting in a restarted
# runner's backlog keeps the answer "not ready" the connection refusals gave.
PROBE_TIMEOUT_S = 10


class RunnerUnavailable(ServiceUnavailable):
    """503 / UNAVAILABLE: the model's runner does not answer (restarting, or still loading)."""

    def __init__(self) -> None:
        super().__init__("the model is not available (its runner is restarting or loading): retry shortly")


class RunnerWatch:
    def __init__(self, runners: list[bentoml.legacy.Runner]) -> None:
        self.runners = runners
        self.ready = False
        self.task: asyncio.Task[None] | None = None

    async def is_ready(self) -> bool:
        """The latest answer; the first call starts the watch in the server's loop and waits for its first probe."""
        if self.task is None:
            self.ready = await self.probe()
            self.task = asyncio.get_running_loop().create_task(self.watch())
        return self.ready

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(PERIOD_S)
            self.ready = await self.probe()

    async def probe(self) -> bool:
        try:
            answers = await asyncio.gather(*(runner.runner_handle_is_ready(PROBE_TIMEOUT_S) for runner in self.runners))
        except Exception:  # refused, reset, not started yet: not ready, whatever the reason
            return False
        return all(answers)


@contextlib.asynccontextmanager
async def runner_reachable() -> AsyncIterator[None]:
    """A runner call that loses its connection answers 503 instead of 500."""
    try:
        yield
    except aiohttp.ClientConnectionError as error:
        raise RunnerUnavailable() from error
    except RemoteException as error:
        if isinstance(error.__cause__ or error.__context__, aiohttp.ClientConnectionError):
            raise RunnerUnavailable() from error
        raise
