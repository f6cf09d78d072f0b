"""Before a request reaches the guard: uvicorn's HTTP/1.1 parser (httptools), bounded.

uvicorn waited for a request's head without end (a connection that sent half a head,
or nothing, stayed open for good), took a head of any size (one 100 MB header line
held the event loop 5.8 s, and every other client with it), and answered what it
could not parse with a text 400. Here a head (the request line and headers) must
arrive within ``head_timeout_s`` (else 408) and ``max_head_bytes`` (else 431):
timed from a new connection's start (one that sends nothing is closed) or from
its first byte on a kept-alive connection. The parser's answers are JSON
``{"error": ...}``, as the guard's are, and close the connection. An ``Upgrade`` header
is renamed before the parser sees it: no other protocol is served.
"""

from __future__ import annotations

import asyncio
import json
import re
import typing as t
import weakref
from dataclasses import dataclass
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .settings import HeadLimits

INVALID_REQUEST = "invalid HTTP request: its request line or a header does not parse"
# An Upgrade header: the service serves no other protocol (curl --http2 asks for h2c on http://, a
# WebSocket client for websocket). httptools stops at it: the body was lost (400 "empty request
# body"), and a WebSocket handshake got uvicorn's bare 400 or 403. Renamed, the request is HTTP/1.1.
UNSERVED_UPGRADE = re.compile(rb"(?i)(?<=\n)upgrade:")
limits = HeadLimits()  # install sets the configured ones
connection_made = HttpToolsProtocol.connection_made
data_received = HttpToolsProtocol.data_received
on_headers_complete = HttpToolsProtocol.on_headers_complete
on_response_complete = HttpToolsProtocol.on_response_complete
connection_lost = HttpToolsProtocol.connection_lost


def install(head_limits: HeadLimits) -> None:
    global limits
    limits = head_limits
    HttpToolsProtocol.connection_made = connection_made_awaiting_head  # type: ignore[method-assign]
    HttpToolsProtocol.data_received = data_received_counted  # type: ignore[method-assign]
    HttpToolsProtocol.on_headers_complete = on_headers_complete_in_time  # type: ignore[method-assign]
    HttpToolsProtocol.on_response_complete = on_response_complete_awaiting_head  # type: ignore[method-assign]
    HttpToolsProtocol.connection_lost = connection_lost_untimed  # type: ignore[method-assign]
    HttpToolsProtocol.send_400_response = send_400_as_json  # type: ignore[method-assign]


@dataclass
class AwaitedHead:
    timer: asyncio.TimerHandle | None  # None: a kept-alive connection before a byte of its next request
    received: int = 0  # bytes of it so far
    tail: bytes = b""  # the last 3 of them: its blank line may come split


awaited: weakref.WeakKeyDictionary[HttpToolsProtocol, AwaitedHead] = weakref.WeakKeyDictionary()


def start_head_timer(protocol: HttpToolsProtocol) -> asyncio.TimerHandle:
    return protocol.loop.call_later(limits.timeout_s, head_timed_out, protocol)


def head_timed_out(protocol: HttpToolsProtocol) -> None:
    """408 for a head begun; a connection that sent nothing just closes, as when kept alive."""
    head = awaited.get(protocol)
    if head is not None and head.received:
        message = f"no whole request head (request line and headers) within {limits.timeout_s} s"
        answer_and_close(protocol, HTTPStatus.REQUEST_TIMEOUT, message)
    else:
        stop_awaiting_head(protocol)
        protocol.transport.close()


def stop_awaiting_head(protocol: HttpToolsProtocol) -> None:
    if (head := awaited.pop(protocol, None)) is not None and head.timer is not None:
        head.timer.cancel()


def connection_made_awaiting_head(protocol: HttpToolsProtocol, transport: t.Any) -> None:
    connection_made(protocol, transport)
    awaited[protocol] = AwaitedHead(start_head_timer(protocol))


def data_received_counted(protocol: HttpToolsProtocol, data: bytes) -> None:
    """Counts a head's bytes before the parser reads them (to where it ends, if it ends here),
    and renames an Upgrade header it would stop at."""
    if (head := awaited.get(protocol)) is not None:
        seen = head.tail + data
        end = seen.find(b"\r\n\r\n")
        in_head = len(data) if end < 0 else end + 4 - len(head.tail)  # of these bytes
        if head.received + in_head > limits.max_bytes:
            message = f"request head (request line and headers) over {limits.max_bytes} bytes"
            return answer_and_close(protocol, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, message)
        head.received, head.tail = head.received + in_head, seen[-3:]
        if head.timer is None:
            head.timer = start_head_timer(protocol)
        if UNSERVED_UPGRADE.search(data, 0, in_head):  # rare: the body's bytes are copied only then
            data = UNSERVED_UPGRADE.sub(b"X-Unserved-Upgrade:", data[:in_head]) + data[in_head:]
    data_received(protocol, data)


def on_headers_complete_in_time(protocol: HttpToolsProtocol) -> None:
    stop_awaiting_head(protocol)
    on_headers_complete(protocol)


def on_response_complete_awaiting_head(protocol: HttpToolsProtocol) -> None:
    """The next request's head is awaited, timed from its first byte: until then the connection
    is idle, which uvicorn's keep-alive timeout bounds (5 s; a runner's 30 min, for its pool)."""
    on_response_complete(protocol)  # starts a pipelined request whose head has come
    if not protocol.transport.is_closing() and (protocol.cycle is None or protocol.cycle.response_complete):
        awaited[protocol] = AwaitedHead(None)


def connection_lost_untimed(protocol: HttpToolsProtocol, exc: Exception | None) -> None:
    stop_awaiting_head(protocol)
    connection_lost(protocol, exc)


def send_400_as_json(protocol: HttpToolsProtocol, _message: str) -> None:
    answer_and_close(protocol, HTTPStatus.BAD_REQUEST, INVALID_REQUEST)


def answer_and_close(protocol: HttpToolsProtocol, status: HTTPStatus, message: str) -> None:
    """The parser's own answer, written as uvicorn writes its 400, but JSON; then the connection closes."""
    stop_awaiting_head(protocol)
    if protocol.transport.is_closing():
        return
    body = json.dumps({"error": message}).encode()
    head = [STATUS_LINE[status]]
    head += [name + b": " + value + b"\r\n" for name, value in protocol.server_state.default_headers]
    head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
    protocol.transport.write(b"".join([*head, b"\r\n", body]))
    protocol.transport.close()
