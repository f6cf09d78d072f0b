"""What stands in front of the APIs on both doors: limits, overload, errors, shutdown.

Admission (per API server, both doors): at most ``max_concurrency`` requests are
served at once; up to ``max_queue`` more wait for a slot, first come first
served; any further request is refused at once, 503 with ``Retry-After`` over
HTTP, UNAVAILABLE with ``grpc-retry-pushback-ms`` over gRPC, so overload sheds
load quickly instead of queueing without end.
While the runner does not answer (``availability``) requests are refused the
same way, and HTTP ``/readyz`` and gRPC health (``Check``) say not ready, as
they do once a drain has begun. With API keys configured (``auth``), every
route but health, metrics and the docs needs one first: 401 / UNAUTHENTICATED.

HTTP (an ASGI middleware, over ``http_parser``'s bounds on each request's head):
bodies over ``max_body_bytes`` get 413 before they are read (a chunked body is
counted as it arrives), and the body of a request refused before it was read is
then read and dropped, up to a bound, so that clients that send it all before
reading see the answer (one that waits to send it, ``Expect: 100-continue``, is
not asked for it). A request takes its slot
once its body has arrived, so a client that sends slowly or stalls holds none
(when it held one until the timeout, 32 stalled connections shut the door). The
bodies held at once are bounded by as many full-size bodies as there are slots
(503 beyond), what the admitted requests could hold before; a client that leaves
mid-body is one "cancelled" answer, not a 500 and a traceback. Every 4xx/5xx body,
on every route, becomes TensorFlow Serving's ``{"error": "..."}``; every response carries an
``X-Request-ID`` (the client's, or a new one), and not BentoML's ``X-BentoML-Request-ID``
beside it. ``?top_k=`` and ``?version=`` are
read here. The OpenAPI document (``/docs.json``) gets the statuses the service
really answers and those parameters. The per-request timeout is BentoML's
(``api_server.traffic.timeout``, 504; 408 while the body has not all arrived;
``RequestTimeout`` frees what each request held once it is answered); on SIGTERM
uvicorn finishes what it holds.

gRPC (a server interceptor): the same admission; the same per-request timeout
(DEADLINE_EXCEEDED); request bytes that do not parse get INVALID_ARGUMENT
instead of UNKNOWN; errors raised before BentoML's handler mapped to their
status; the ``top_k``, ``version`` and ``x-request-id`` metadata keys, the request id sent
back in the trailing metadata. gRPC's own message
limit (``api_server.grpc.max_message_length``) answers RESOURCE_EXHAUSTED.
BentoML's gRPC worker dies at once on SIGTERM, dropping what it holds; here
SIGTERM first refuses new calls and waits for those in flight (at most the
request timeout), then lets the signal take its course.

Both doors record every answer in ``observability``'s metrics and name the
request id in log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import time
import typing as t
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from urllib.parse import parse_qs

import grpc
from bentoml._internal.server.http import traffic
from bentoml.exceptions import BadInput, BentoMLException, ServiceUnavailable
from bentoml.grpc.utils import grpc_status_code
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from starlette.responses import JSONResponse

from . import grpc_certificates, http_client_certificates, http_parser, versions
from .api import requested_top_k, requested_version
from .asgi import ERROR_SCHEMA, BodyRewrite, Message, Receive, Scope, Send, rewrite_responses
from .auth import DOCS_HTTP_PATHS, HEALTH_GRPC_METHODS, HEALTH_HTTP_PATHS, UNAUTHORIZED, ApiKeys, api_keys
from .availability import RunnerUnavailable, RunnerWatch
from .errors import MethodNotAllowed, PayloadTooLarge, Unauthenticated, register_grpc_status_codes
from .memory import trimmed_when_idle
from .observability import (
    REQUEST_ID_KEY,
    add_trailing_metadata,
    configure_logging,
    metrics,
    request_id,
    request_id_from,
)
from .protocols import DOORS

if t.TYPE_CHECKING:
    import bentoml

    from .settings import Settings


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# Health, metrics and docs skip admission (an overloaded server still answers its orchestrator);
# the same sets auth.py leaves open.
UNGUARDED_PATHS = HEALTH_HTTP_PATHS | DOCS_HTTP_PATHS
UNGUARDED_METHODS = HEALTH_GRPC_METHODS
READINESS_METHODS = ("GET", "HEAD")
DRAIN_POLL_S = 0.05
LINGER_BYTES = 256 << 20  # of a refused request's body read and dropped, at most
LINGER_S = 10
FLUSH_S = 0.5  # after the last call in flight has answered, for its bytes to leave
BENTOML_REQUEST_ID = b"x-bentoml-request-id"
TIMED_OUT_STATUS = "inception_v3.timed_out_status"  # the scope key: what RequestTimeout answered instead
# What the APIs answer besides BentoML's documented 200, 400, 404 and 500.
DOCUMENTED_ERRORS = (
    HTTPStatus.REQUEST_TIMEOUT,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    HTTPStatus.SERVICE_UNAVAILABLE,
    HTTPStatus.GATEWAY_TIMEOUT,
)


class Overloaded(ServiceUnavailable):
    """503 / UNAVAILABLE: no slot free and the queue full, or the server shutting down."""


class ClientGoneError(Exception):
    """The client closed the connection before its request's body had arrived."""


class BodyTooLarge(PayloadTooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the {limit}-byte limit")


def parse_top_k(value: str | None) -> int | None:
    if value is None:
        return None
    # Its length first: int() refuses more than 4300 digits with a ValueError.
    if not (value.isascii() and value.isdigit() and len(value) <= 4) or not 1 <= int(value) <= 1000:
        raise BadInput(f"top_k must be an integer from 1 to 1000, got {value!r}")
    return int(value)


def parse_version(value: str | None) -> int | None:
    if value is None:
        return None
    if (number := versions.parse_number(value)) is None:
        raise BadInput(f"version must be a model version number, got {value!r}")
    return number


def take_request_options(top_k: str | None, version: str | None) -> None:
    """The per-request options both doors carry (query parameters, gRPC metadata)."""
    requested_top_k.set(parse_top_k(top_k))
    requested_version.set(parse_version(version))


class Admission:
    """``max_concurrency`` requests served at once, ``max_queue`` more waiting, the rest refused."""

    def __init__(self, protocol: str, max_concurrency: int, max_queue: int, runner: RunnerWatch) -> None:
        self.protocol = protocol
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.runner = runner
        self.slots = asyncio.Semaphore(max_concurrency)  # FIFO; binds to the server's loop on first use
        self.running = 0
        self.waiting = 0
        self.draining = False

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.draining:
            raise Overloaded("server shutting down: retry on another replica or shortly")
        if not await self.runner.is_ready():
            raise RunnerUnavailable()
        if self.slots.locked():
            if self.waiting >= self.max_queue:
                raise Overloaded(
                    f"server busy: {self.running} requests being served and {self.waiting} waiting; retry shortly"
                )
            self.waiting += 1
            metrics().queued.labels(self.protocol).inc()
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
                metrics().queued.labels(self.protocol).dec()
        else:
            await self.slots.acquire()
        self.running += 1
        metrics().in_flight.labels(self.protocol).inc()
        try:
            yield
        finally:
            self.running -= 1
            metrics().in_flight.labels(self.protocol).dec()
            self.slots.release()

    async def ready(self) -> bool:
        """What ``/readyz`` and gRPC health say: not draining, and the runner answers."""
        return not self.draining and await self.runner.is_ready()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; return when none is served or waiting, or after ``timeout_s``."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while (self.running or self.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)


class HttpGuard:
    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], t.Awaitable[None]],
        admission: Admission,
        max_body_bytes: int,
        retry_after_s: int,
        api_paths: frozenset[str],
        ready_note: str | None = None,
        keys: ApiKeys | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.bodies_held = 0
        self.retry_after_s = retry_after_s
        self.api_paths = api_paths
        self.ready_body = f"ready; {ready_note}\n".encode() if ready_note else b"\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and self.keys and not self.keys.http_path_open(path):
            if not self.keys.allows(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")):
                challenge = [(b"www-authenticate", b"Bearer")]
                return await refuse(Unauthenticated(UNAUTHORIZED), scope, receive, send, challenge)
        if scope["type"] == "http" and path == "/readyz":
            if scope["method"] not in READINESS_METHODS:
                allow = [(b"allow", ", ".join(READINESS_METHODS).encode())]
                answers = " and ".join(READINESS_METHODS)
                return await refuse(MethodNotAllowed(f"/readyz answers {answers}"), scope, receive, send, allow)
            return await self.readiness(send)
        if scope["type"] != "http" or path in UNGUARDED_PATHS or path.startswith("/static"):
            if scope["type"] == "http" and not content_type_is_ascii(scope):
                return await refuse(BadInput(NOT_ASCII), scope, receive, send)
            if scope["type"] == "http":
                send = rewrite_responses(send, lambda start: self.on_unguarded_start(start, path))
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = request_id_from(headers.get(REQUEST_ID_KEY.encode(), b"").decode("latin-1"))
        request_id.set(rid)
        started = time.perf_counter()
        answer: dict[str, int] = {}
        send = rewrite_responses(send, lambda start: self.on_response_start(start, rid, answer))
        try:
            await self.guarded(scope, receive, send, headers, answer)
        finally:
            status = str(answer.get("status") or scope.get(TIMED_OUT_STATUS, "cancelled"))
            metrics().answered("http", self.endpoint(path), status, time.perf_counter() - started)

    async def guarded(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], answer: dict[str, int]
    ) -> None:
        try:
            if not content_type_is_ascii(scope):
                raise BadInput(NOT_ASCII)
            take_request_options(query_param(scope, "top_k"), query_param(scope, "version"))
            declared = headers.get(b"content-length", b"").strip()  # RFC 9110: whitespace around is no part of it
            if declared and (not declared.isdigit() or int(declared) > self.max_body_bytes):
                raise BodyTooLarge(self.max_body_bytes)
            body = await self.read_body(receive)
            try:
                async with self.admission.slot():
                    await self.app(scope, replayed(body, receive), send)
            finally:
                self.bodies_held -= len(body)
        except ClientGoneError:
            return
        except BentoMLException as error:  # the guard's own refusals; the APIs answer theirs
            if "status" in answer:
                raise
            await refuse(error, scope, receive, send)

    async def readiness(self, send: Send) -> None:
        ready = await self.admission.ready()
        body = self.ready_body if ready else json.dumps({"error": RunnerUnavailable().message}).encode()
        headers = [
            (b"content-type", b"text/plain" if ready else b"application/json"),
            (b"content-length", str(len(body)).encode()),  # not chunked: an HTTP/1.0 client reads no chunks
        ]
        if not ready:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        await send({"type": "http.response.start", "status": 200 if ready else 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def read_body(self, receive: Receive) -> bytes:
        """The whole body, counted as it arrives (a chunked body has no other bound) and against
        what all requests of this server hold (``bodies_held``, until they are answered)."""
        chunks: list[bytes] = []
        held = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGoneError
                chunk = message.get("body", b"")
                if held + len(chunk) > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                if self.bodies_held + len(chunk) > self.admission.max_concurrency * self.max_body_bytes:
                    raise Overloaded(f"server busy: {self.bodies_held >> 20} MiB of request bodies held; retry shortly")
                chunks.append(chunk)
                held += len(chunk)
                self.bodies_held += len(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        except BaseException:
            self.bodies_held -= held
            raise

    def on_response_start(self, start: Message, rid: str, answer: dict[str, int]) -> BodyRewrite | None:
        status = answer["status"] = start["status"]
        # One request ID, the one the logs carry: BentoML's own (a trace-context number) goes.
        kept = [(key, value) for key, value in start.get("headers", []) if key.lower() != BENTOML_REQUEST_ID]
        headers = [*kept, (REQUEST_ID_KEY.encode(), rid.encode("latin-1"))]
        start["headers"] = headers
        return None if status < 400 else self.as_json_error(start)

    def on_unguarded_start(self, start: Message, path: str) -> BodyRewrite | None:
        """Health, metrics and docs: errors as JSON too (a 405 was Starlette's text), no request id."""
        if start["status"] >= 400:
            return self.as_json_error(start)
        return document_openapi if path == "/docs.json" and start["status"] == 200 else None

    def as_json_error(self, start: Message) -> BodyRewrite:
        status = start["status"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-type"]
        headers.append((b"content-type", b"application/json"))
        if status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        start["headers"] = headers
        return lambda body: error_body(body, status)

    def endpoint(self, path: str) -> str:
        """A metrics label from a bounded set: an API route, a door's routes (``Door.metrics_endpoint``), or "other"."""
        if path in self.api_paths:
            return path
        return next((door.metrics_endpoint for door in DOORS if door.serves(path)), "other")


NOT_ASCII = "the Content-Type header must be ASCII text"


def replayed(body: bytes, receive: Receive) -> Receive:
    """The body, read already, as one message; then the connection's own (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_replayed() -> Message:
        return pending.pop() if pending else await receive()

    return receive_replayed


def content_type_is_ascii(scope: Scope) -> bool:
    """BentoML's access log, inside this guard, decodes the header as UTF-8 once the answer has
    started: other bytes broke the answer (a 200 without its body) or made it a 500."""
    return all(value.isascii() for name, value in scope["headers"] if name == b"content-type")


async def refuse(
    error: BentoMLException,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer ``error`` as JSON before the request's body is read, then read and drop the body;
    but for a client that waits to send it (``Expect: 100-continue``, as curl does past 1 MB),
    which the answer tells not to: that connection closes instead (reading would send a 100)."""
    body = json.dumps({"error": error.message}).encode()
    waits_to_send = (b"expect", b"100-continue") in ((name, value.lower()) for name, value in scope["headers"])
    start_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),  # not chunked: an HTTP/1.0 client reads no chunks
        *([(b"connection", b"close")] if waits_to_send else []),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": int(error.error_code), "headers": start_headers})
    await send({"type": "http.response.body", "body": body, "more_body": not waits_to_send})
    if not waits_to_send:
        await discard_body(receive)
        await send({"type": "http.response.body", "body": b""})


async def discard_body(receive: Receive) -> None:
    """Read and drop what the client still sends of a refused request, up to ``LINGER_BYTES`` and ``LINGER_S``.

    A server that closes a connection with unread bytes resets it, and clients that
    send the whole body before reading (Python's urllib) then see the reset, not the
    refusal: nginx's lingering close.
    """
    discarded = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while discarded <= LINGER_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
                discarded += len(message.get("body", b""))


def error_body(raw: bytes, status: int) -> bytes:
    text = raw.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return raw  # ours already, with what a protocol adds (Open Inference's "ready": false)
    if isinstance(parsed, dict) and "detail" in parsed:
        message = str(parsed["detail"])
    elif isinstance(parsed, str) and parsed.strip():
        message = parsed.removeprefix("BentoService error handling API request: ").strip()
    else:
        message = {
            404: "not found",
            405: "method not allowed",
            500: "internal server error",
            503: "server busy: retry shortly",
        }.get(status, f"HTTP {status}")
    return json.dumps({"error": message}).encode()


def document_openapi(raw: bytes) -> bytes:
    """BentoML documents 200, 400, 404 and 500 only; add the statuses the APIs answer, ``top_k`` and ``version``."""
    spec = json.loads(raw)
    spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, item in spec.get("paths", {}).items():
        operation = item.get("post")
        if operation is None or "x-bentoml-name" not in operation:
            continue
        for status in DOCUMENTED_ERRORS:
            operation["responses"][str(status.value)] = {
                "description": status.phrase,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        if path == "/predict":
            operation["parameters"] = [
                {
                    "name": "top_k",
                    "in": "query",
                    "required": False,
                    "description": "how many classes to return, best first (default 5)",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                {
                    "name": "version",
                    "in": "query",
                    "required": False,
                    "description": "the model version to answer (default: the newest available); 404 if not served",
                    "schema": {"type": "integer", "minimum": 0},
                },
            ]
    return json.dumps(spec).encode()


def query_param(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True).get(name)
    return values[-1] if values else None


class Undecodable:
    """Request bytes that are not the method's protobuf message: answered INVALID_ARGUMENT.

    grpc answers a deserializer's exception with UNKNOWN and logs a traceback, so
    the deserializer returns this instead; ``ByteSize`` is for BentoML's access log.
    """

    def __init__(self, size: int, error: str) -> None:
        self.size = size
        self.error = error

    def ByteSize(self) -> int:  # noqa: N802 (protobuf's name)
        return self.size


def tolerant(deserialize: Callable[[bytes], t.Any] | None) -> Callable[[bytes], t.Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> t.Any:
        try:
            return deserialize(raw)
        except DecodeError as error:
            return Undecodable(len(raw), str(error))

    return parse


async def decoded(request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.error}")
    return request


async def answered(result: t.Any, context: grpc.aio.ServicerContext) -> t.Any:
    """A streaming behaviour's answers: an async generator's, written here, or a coroutine's, which writes its own."""
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
        return None
    return await result


def undecodable_refused(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Any method, whatever its kind: request bytes that do not parse are INVALID_ARGUMENT."""
    changes: dict[str, t.Any] = {"request_deserializer": tolerant(handler.request_deserializer)}
    if inner := handler.unary_unary:

        async def unary_unary(request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:
            response = inner(await decoded(request, context), context)
            return await response if inspect.isawaitable(response) else response  # grpc runs both kinds

        changes["unary_unary"] = unary_unary
    elif inner := handler.unary_stream:

        async def unary_stream(request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:
            return await answered(inner(await decoded(request, context), context), context)

        changes["unary_stream"] = unary_stream
    else:
        kind = "stream_unary" if handler.stream_unary else "stream_stream"
        inner = getattr(handler, kind)

        async def streamed(requests: t.AsyncIterator[t.Any], context: grpc.aio.ServicerContext) -> t.Any:
            async def checked() -> t.AsyncIterator[t.Any]:
                async for request in requests:
                    yield await decoded(request, context)

            return await answered(inner(checked(), context), context)

        changes[kind] = streamed
    return handler._replace(**changes)


def refused(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with its behaviour, whatever the method's kind, replaced by UNAUTHENTICATED."""

    async def deny(_request: t.Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED)

    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    return handler._replace(**{kind: deny})


class Aborted:
    """What a handler that aborted returns: nothing is sent; ``ByteSize`` is for BentoML's access log."""

    def ByteSize(self) -> int:  # noqa: N802 (protobuf's name)
        return 0


class GrpcGuard(grpc.aio.ServerInterceptor):
    def __init__(self, admission: Admission, timeout_s: float, retry_after_s: int, keys: ApiKeys | None) -> None:
        self.admission = admission
        self.keys = keys
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.drain_task: asyncio.Task[None] | None = None
        self.sigterm_handled = False

    async def intercept_service(
        self, continuation: Callable[[t.Any], t.Awaitable[t.Any]], handler_call_details: t.Any
    ) -> t.Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        handler = undecodable_refused(handler)
        method = handler_call_details.method
        self.handle_sigterm()
        if self.keys and not self.keys.grpc_method_open(method):
            if not self.keys.allows(dict(handler_call_details.invocation_metadata or ()).get("authorization")):
                return refused(handler)
        if method == HEALTH_CHECK:
            return handler._replace(unary_unary=self.health_check(handler.unary_unary))
        if handler.unary_unary is None or method.startswith("/grpc.health.") or method in UNGUARDED_METHODS:
            return handler
        inner = handler.unary_unary

        async def guarded(request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:
            metadata = dict(context.invocation_metadata() or ())
            rid = request_id_from(str(metadata.get(REQUEST_ID_KEY, "")))
            request_id.set(rid)
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            started = time.perf_counter()
            failed = True
            try:
                with trimmed_when_idle():
                    response = await self.admit(inner, request, context, metadata)
                failed = False
                return response
            except grpc.aio.AbortError:
                # The status has gone out with the abort; answering normally keeps it in
                # BentoML's access log, whose interceptor logs any exception as INTERNAL.
                return Aborted()
            finally:
                code = context.code()
                status = code.name if code is not None else ("UNKNOWN" if failed else "OK")
                metrics().answered("grpc", method, status, time.perf_counter() - started)

        return handler._replace(unary_unary=guarded)

    async def admit(
        self,
        inner: Callable[..., t.Awaitable[t.Any]],
        request: t.Any,
        context: grpc.aio.ServicerContext,
        metadata: dict[str, t.Any],
    ) -> t.Any:
        try:
            take_request_options(metadata.get("top_k"), metadata.get("version"))
            async with self.admission.slot():
                async with asyncio.timeout(self.timeout_s):
                    return await inner(request, context)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"not answered within {self.timeout_s} s")
        except ServiceUnavailable as error:
            add_trailing_metadata(context, ("grpc-retry-pushback-ms", str(self.retry_after_s * 1000)))
            await context.abort(grpc.StatusCode.UNAVAILABLE, error.message)
        except BentoMLException as error:
            await context.abort(grpc_status_code(error), error.message)

    def health_check(self, inner: Callable[..., t.Awaitable[t.Any]]) -> Callable[..., t.Awaitable[t.Any]]:
        """SERVING only while not draining and the runner answers."""

        async def check(request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:
            response = await inner(request, context)
            if response.status == health_pb2.HealthCheckResponse.SERVING and not await self.admission.ready():
                response.status = health_pb2.HealthCheckResponse.NOT_SERVING
            return response

        return check

    def handle_sigterm(self) -> None:
        """Installed with the first call, in the server's event loop; until then SIGTERM has nothing to drain."""
        if self.sigterm_handled:
            return
        self.sigterm_handled = True
        loop = asyncio.get_running_loop()

        def start_drain() -> None:
            if self.drain_task is None:
                self.drain_task = loop.create_task(self.drain_then_exit(loop))

        loop.add_signal_handler(signal.SIGTERM, start_drain)

    async def drain_then_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        await self.admission.drain(self.timeout_s)
        await asyncio.sleep(FLUSH_S)
        loop.remove_signal_handler(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)


class RequestTimeout(traffic.TimeoutMiddleware):
    """BentoML's per-request timeout (504 when no answer has begun in time), its timer cancelled on answer.

    BentoML 1.4.39's leaves each request's timer scheduled for the whole timeout, and
    the timer holds the request's context, so every request (its body, in the runner
    its pixels) stayed in memory for 30 s after its answer: at 30-40 requests/s,
    100-300 MiB more in each API server and in the runner. Both build their
    middleware from ``traffic.TimeoutMiddleware``, which ``install`` replaces.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope.get("path") in HEALTH_HTTP_PATHS:  # probes (every 0.5 s) must not keep a process from trimming
            return await self.answer_in_time(scope, receive, send)
        with trimmed_when_idle():
            await self.answer_in_time(scope, receive, send)

    async def answer_in_time(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        answering = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, answering)
        body = BodyWatch(receive)

        async def send_and_note(message: Message) -> None:
            if not answering.done():
                answering.set_result(None)
            await send(message)

        answer = asyncio.ensure_future(self.app(scope, body.receive, send_and_note))
        # An app that fails before it answers ends the wait too (BentoML's waited for the timeout).
        answer.add_done_callback(lambda _: answering.done() or answering.set_result(None))
        try:
            await answering
        except TimeoutError:
            if not answer.done():
                if body.awaited:  # the client's fault, not the server's: 408, as nginx answers
                    status, message = HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive"
                else:
                    status, message = HTTPStatus.GATEWAY_TIMEOUT, "not answered"
                scope[TIMED_OUT_STATUS] = int(status)  # for HttpGuard's metrics, inside, which the cancel ends
                answer.cancel()
                await JSONResponse({"error": f"{message} within {self.timeout} s"}, status_code=status)(
                    scope, receive, send
                )
            return
        finally:
            timer.cancel()
        await answer


class BodyWatch:
    """A request's ``receive``, noting whether the app is waiting for more of the body (``awaited``)."""

    def __init__(self, receive: Receive) -> None:
        self.inner = receive
        self.waiting = False
        self.complete = False

    @property
    def awaited(self) -> bool:
        return self.waiting and not self.complete

    async def receive(self) -> Message:
        self.waiting = True
        try:
            message = await self.inner()
        finally:
            self.waiting = False
        if message["type"] != "http.request" or not message.get("more_body"):
            self.complete = True
        return message


def install(svc: bentoml.legacy.Service, settings: Settings, ready_note: str | None = None) -> None:
    """``ready_note``: what ``/readyz`` says besides "ready" (the warning for random weights)."""
    traffic.TimeoutMiddleware = RequestTimeout
    http_parser.install(settings.head_limits)
    register_grpc_status_codes()
    grpc_certificates.install()
    http_client_certificates.install()
    configure_logging()
    limits = {
        "max_concurrency": settings.max_concurrency,
        "max_queue": settings.max_queue,
        "runner": RunnerWatch(list(svc.runners)),
    }
    keys = api_keys(settings.api_keys_file, settings.protect_health_and_metrics)
    svc.add_asgi_middleware(
        HttpGuard,
        admission=Admission("http", **limits),
        max_body_bytes=settings.max_body_bytes,
        retry_after_s=settings.retry_after_s,
        api_paths=frozenset("/" + api.route.lstrip("/") for api in svc.apis.values()),
        ready_note=ready_note,
        keys=keys,
    )
    svc.add_grpc_interceptor(
        GrpcGuard,
        admission=Admission("grpc", **limits),
        timeout_s=settings.request_timeout_s,
        retry_after_s=settings.retry_after_s,
        keys=keys,
    )
