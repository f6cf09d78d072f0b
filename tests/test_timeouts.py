"""The per-request timeout of the HTTP API servers and the runner (``guards.RequestTimeout``):
a late answer is 504, or 408 while the client has not sent all the body, and an answered
request is freed at once, not after the timeout."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import time
import weakref

import pytest

from inception_v3.asgi import Message, Receive, Scope, Send
from inception_v3.guards import TIMED_OUT_STATUS, RequestTimeout

request_var: contextvars.ContextVar[object] = contextvars.ContextVar("request_var")


class Request:
    """Stands in for what BentoML keeps in a request's context: the request and its body."""


def serve_one(delay_s: float, timeout_s: float, fail: bool = False) -> tuple[list[Message], int]:
    """Serve one request that takes ``delay_s``; return what was sent, and how many of its
    request objects were still held once it was over, the event loop still running (as in a server)."""
    sent: list[Message] = []
    requests: list[weakref.ref] = []

    async def app(_scope: Scope, _receive: Receive, send: Send) -> None:
        request = Request()
        requests.append(weakref.ref(request))
        request_var.set(request)
        await asyncio.sleep(delay_s)
        if fail:
            raise RuntimeError("failed before answering")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def serve() -> int:
        await asyncio.create_task(RequestTimeout(app, timeout=timeout_s)({"type": "http"}, receive, send))
        gc.collect()
        return sum(request() is not None for request in requests)

    return sent, asyncio.run(serve())


def test_an_answered_request_is_freed_at_once() -> None:
    sent, held = serve_one(delay_s=0, timeout_s=30)
    assert sent[0]["status"] == 200
    assert held == 0, "the request outlived its answer"


def test_a_late_answer_is_504_with_a_json_error() -> None:
    sent, _ = serve_one(delay_s=5, timeout_s=0.05)
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {"error": "not answered within 0.05 s"}


def test_an_app_that_fails_before_answering_does_not_wait_for_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="failed before answering"):
        serve_one(delay_s=0, timeout_s=30, fail=True)
    assert time.monotonic() - started < 5


def answer_while_reading(body: list[Message], then_wait_for_disconnect: bool = False) -> tuple[int, dict, int]:
    """The timeout's answer to an app that reads the body and then, if it all came, works past
    the timeout (``then_wait_for_disconnect``: waiting on ``receive`` as streaming answers do).
    The client sends ``body``'s messages and then nothing. Returns the status, the error, and
    the status the scope tells the guard inside (for its metrics)."""
    sent: list[Message] = []
    pending = list(body)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(60)  # a client that stalls, or stays connected
        return {"type": "http.disconnect"}

    async def app(_scope: Scope, receive: Receive, _send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        if then_wait_for_disconnect:
            await receive()
        await asyncio.sleep(60)

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http"}
    asyncio.run(RequestTimeout(app, timeout=0.05)(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"]), scope[TIMED_OUT_STATUS]


def test_a_body_that_stops_arriving_is_408() -> None:
    status, error, told = answer_while_reading([{"type": "http.request", "body": b"x", "more_body": True}])
    assert (status, error, told) == (408, {"error": "the request body did not arrive within 0.05 s"}, 408)


def test_a_body_that_never_starts_is_408() -> None:
    assert answer_while_reading([])[0] == 408


@pytest.mark.parametrize("then_wait_for_disconnect", [False, True])
def test_a_late_answer_to_a_whole_body_is_504(then_wait_for_disconnect: bool) -> None:
    whole = [{"type": "http.request", "body": b"x", "more_body": True}, {"type": "http.request", "body": b"y"}]
    status, _, told = answer_while_reading(whole, then_wait_for_disconnect)
    assert status == told == 504
