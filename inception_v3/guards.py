"""What stands in front of the APIs on both doors: limits, overload, error bodies.

HTTP (an ASGI middleware): bodies over ``max_body_bytes`` get 413 before they
are read; more than ``max_in_flight`` requests get 503 with Retry-After at once;
every 4xx/5xx body becomes TensorFlow Serving's ``{"error": "..."}``; each
response carries an ``X-Request-ID`` (the client's, or a new one) that the
server's log lines name too. ``?top_k=`` is read here.

gRPC (a server interceptor): the same in-flight limit (UNAVAILABLE), errors that
BentoML raises before its own handler (an unknown API name) mapped to their
status instead of UNKNOWN, and the ``top_k`` metadata key. gRPC's own message
limit (``api_server.grpc.max_message_length``) answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextvars
import json
import typing as t
import uuid

import grpc
from bentoml.exceptions import BentoMLException
from bentoml.grpc.utils import grpc_status_code

from .api import requested_top_k
from .errors import InvalidImage, register_grpc_status_codes

if t.TYPE_CHECKING:
    import bentoml

    from .settings import Settings

Scope = dict[str, t.Any]
Message = dict[str, t.Any]
Receive = t.Callable[[], t.Awaitable[Message]]
Send = t.Callable[[Message], t.Awaitable[None]]

UNGUARDED_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics", "/docs.json", "/"})
RETRY_AFTER_S = "1"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def parse_top_k(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise InvalidImage(f"top_k must be an integer from 1 to 1000, got {value!r}")
    return int(value)


class BodyTooLargeError(Exception):
    pass


class HttpGuard:
    def __init__(self, app: t.Callable[..., t.Awaitable[None]], max_body_bytes: int, max_in_flight: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS or scope["path"].startswith("/static"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        request_id.set(rid)
        send = self.error_bodies_as_json(send, rid)
        try:
            top_k = parse_top_k(query_param(scope, "top_k"))
        except BentoMLException as error:
            return await respond(send, int(error.error_code), error.message)
        requested_top_k.set(top_k)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await respond(send, 413, f"request body over the {self.max_body_bytes}-byte limit")
        if self.in_flight >= self.max_in_flight:
            return await respond(send, 503, f"server busy: {self.in_flight} requests in flight; retry shortly")
        self.in_flight += 1
        try:
            await self.app(scope, self.counting(receive), send)
        except BodyTooLargeError:
            await respond(send, 413, f"request body over the {self.max_body_bytes}-byte limit")
        finally:
            self.in_flight -= 1

    def counting(self, receive: Receive) -> Receive:
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLargeError
            return message

        return receive_counted

    @staticmethod
    def error_bodies_as_json(send: Send, rid: str) -> Send:
        """Rewrite error responses as {"error": message}; add Retry-After to 503 and 429."""
        pending: Message | None = None
        chunks: list[bytes] = []

        async def send_rewritten(message: Message) -> None:
            nonlocal pending
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
                if message["status"] >= 400:
                    pending = message
                    return
            elif pending is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = error_body(b"".join(chunks), pending["status"])
                headers = [
                    (k, v) for k, v in pending["headers"] if k.lower() not in (b"content-length", b"content-type")
                ]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if pending["status"] in (429, 503):
                    headers.append((b"retry-after", RETRY_AFTER_S.encode()))
                await send({**pending, "headers": headers})
                message = {"type": "http.response.body", "body": body}
                pending = None
            await send(message)

        return send_rewritten


def error_body(raw: bytes, status: int) -> bytes:
    text = raw.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed["error"]
    elif isinstance(parsed, dict) and "detail" in parsed:
        message = str(parsed["detail"])
    elif isinstance(parsed, str) and parsed.strip():
        message = parsed.removeprefix("BentoService error handling API request: ").strip()
    else:
        message = {404: "not found", 405: "method not allowed", 500: "internal server error"}.get(
            status, f"HTTP {status}"
        )
    return json.dumps({"error": message}).encode()


def query_param(scope: Scope, name: str) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[-1] if values else None


async def respond(send: Send, status: int, message: str) -> None:
    # Goes through error_bodies_as_json, which adds the JSON framing and headers.
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"error": message}).encode()})


class GrpcGuard(grpc.aio.ServerInterceptor):
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or "grpc.health" in handler_call_details.method:
            return handler
        inner = handler.unary_unary

        async def guarded(request: t.Any, context: grpc.aio.ServicerContext) -> t.Any:
            metadata = dict(context.invocation_metadata() or ())
            request_id.set(str(metadata.get("x-request-id", "")) or uuid.uuid4().hex)
            try:
                requested_top_k.set(parse_top_k(metadata.get("top_k")))
                if self.in_flight >= self.max_in_flight:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "server busy; retry shortly")
                self.in_flight += 1
                try:
                    return await inner(request, context)
                finally:
                    self.in_flight -= 1
            except BentoMLException as error:
                await context.abort(grpc_status_code(error), error.message)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def install(svc: bentoml.legacy.Service, settings: Settings) -> None:
    register_grpc_status_codes()
    svc.add_asgi_middleware(HttpGuard, max_body_bytes=settings.max_body_bytes, max_in_flight=settings.max_in_flight)
    svc.add_grpc_interceptor(GrpcGuard, max_in_flight=settings.max_in_flight)
