"""Freed memory handed back once a process is idle (``memory.TrimWhenIdle``), as the HTTP
servers and the runner (``guards.RequestTimeout``) and the gRPC door (``guards.GrpcGuard``) use it."""

from __future__ import annotations

import asyncio

import pytest

from inception_v3 import memory
from inception_v3.asgi import Message
from inception_v3.guards import RequestTimeout

IDLE_S = 0.3  # a wide margin: a busy box oversleeps


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """The trims ``release_freed_memory`` would have done, counted (their effect on memory is the benchmark's)."""
    done: list[None] = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: done.append(None))
    monkeypatch.setattr(memory.IDLE_TRIM, "idle_s", IDLE_S)
    return done


def test_trims_once_the_last_request_is_over_and_the_process_stays_idle(trims: list[None]) -> None:
    idle = memory.TrimWhenIdle(IDLE_S)

    async def scenario() -> None:
        with idle.request():
            with idle.request():
                pass
            await asyncio.sleep(2 * IDLE_S)
            assert trims == [], "trimmed while a request was in flight"
        await asyncio.sleep(IDLE_S / 6)
        with idle.request():  # a request within the idle time postpones the trim
            pass
        await asyncio.sleep(IDLE_S / 6)
        assert trims == []
        await asyncio.sleep(1.5 * IDLE_S)
        assert len(trims) == 1
        await asyncio.sleep(2 * IDLE_S)
        assert len(trims) == 1, "idle, but trimmed again"

    asyncio.run(scenario())


def serve(path: str) -> None:
    async def app(_scope: dict, _receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Message) -> None:
        pass

    async def scenario() -> None:
        await RequestTimeout(app, timeout=30)({"type": "http", "path": path}, receive, send)
        await asyncio.sleep(2 * IDLE_S)

    asyncio.run(scenario())


def test_a_request_is_followed_by_a_trim_and_a_health_probe_is_not(trims: list[None]) -> None:
    """The API servers probe the runner every 0.5 s: probes counted as requests, it would never trim."""
    serve("/readyz")
    assert trims == []
    serve("/classify")
    assert len(trims) == 1
