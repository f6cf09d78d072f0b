"""Whether the runner answers, as an API server sees it: refuse at once while it does not.

When the runner is gone (killed, restarting, loading the model) BentoML's
runner client fails each call with a connection error (a 500), or, while a
runner's socket is open but no worker serves it (the launcher restarting a dead
worker, a new runner loading its model), waits in the socket's backlog until
one does. ``RunnerWatch`` asks the runners' ``/readyz`` every ``PERIOD_S`` (a
local runner is always ready): a refusal or "not ready" is an outage at once; a
probe that gets no answer within ``PROBE_TIMEOUT_S`` is one only once nothing
from the runner (probe or call) has answered for ``STALE_S``, since a runner
busy with batches on a loaded box answers its probes late. While out, the guards
refuse calls, 503 / UNAVAILABLE with a retry hint, and say not ready on
``/readyz`` and gRPC health. ``runner_reachable`` turns what happens to calls
already on their way into the same 503: connection errors, and, when an outage
begins, calls waiting in a backlog, which are cut off rather than left to hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import typing as t
from collections.abc import AsyncIterator

import aiohttp
from bentoml.exceptions import RemoteException, ServiceUnavailable

if t.TYPE_CHECKING:
    import bentoml

PERIOD_S = 0.5
PROBE_TIMEOUT_S = 1.0
STALE_S = 3.0


class RunnerUnavailable(ServiceUnavailable):
    """503 / UNAVAILABLE: the model's runner does not answer (restarting, or still loading)."""

    def __init__(self) -> None:
        super().__init__("the model is not available (its runner is restarting or loading): retry shortly")


class RunnerWatch:
    """One per API server process (``watching`` is it); the guards and ``runner_reachable`` share it."""

    def __init__(self, runners: list[bentoml.legacy.Runner]) -> None:
        global watching
        self.runners = runners
        self.ready = False
        self.answered_at = -math.inf  # when a probe or a call last got an answer from the runner
        self.calls: set[asyncio.Task[t.Any]] = set()  # requests waiting for the runner
        self.cut_off: set[asyncio.Task[t.Any]] = set()
        self.task: asyncio.Task[None] | None = None
        watching = self

    async def is_ready(self) -> bool:
        """The latest answer; the first call starts the watch in the server's loop and waits for its first probe."""
        if self.task is None:
            self.update(await self.probe())
            self.task = asyncio.get_running_loop().create_task(self.watch())
        return self.ready

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(PERIOD_S)
            self.update(await self.probe())

    async def probe(self) -> bool | None:
        """True: ready; False: refused or not ready; None: no answer within ``PROBE_TIMEOUT_S``."""
        probes = (runner.runner_handle_is_ready(10 * PROBE_TIMEOUT_S) for runner in self.runners)
        try:
            return all(await asyncio.wait_for(asyncio.gather(*probes), PROBE_TIMEOUT_S))
        except TimeoutError:
            return None
        except Exception:  # refused, reset, not started yet: not ready, whatever the reason
            return False

    def update(self, answer: bool | None) -> None:
        now = time.monotonic()
        if answer:
            self.answered_at = now
        ready = answer if answer is not None else now - self.answered_at < STALE_S
        if self.ready and not ready:
            self.cut_off |= self.calls
            for call in self.calls:
                call.cancel()
        self.ready = ready


watching: RunnerWatch | None = None


@contextlib.asynccontextmanager
async def runner_reachable() -> AsyncIterator[None]:
    """A runner call that loses its connection, or is cut off as an outage begins, answers 503 instead of 500."""
    watch, call = watching, asyncio.current_task()
    if watch is not None and call is not None:
        watch.calls.add(call)
    try:
        yield
    except asyncio.CancelledError:
        if watch is None or call not in watch.cut_off:
            raise
        call.uncancel()
        raise RunnerUnavailable() from None
    except aiohttp.ClientConnectionError as error:
        raise RunnerUnavailable() from error
    except RemoteException as error:
        if isinstance(error.__cause__ or error.__context__, aiohttp.ClientConnectionError):
            raise RunnerUnavailable() from error
        raise
    else:
        if watch is not None:
            watch.answered_at = time.monotonic()
    finally:
        if watch is not None:
            watch.calls.discard(call)
            watch.cut_off.discard(call)
