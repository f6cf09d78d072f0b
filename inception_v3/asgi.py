"""ASGI's types and a response rewriter, shared by the guards, the OpenAPI document and ``/schema.json``."""

from __future__ import annotations

import typing as t
from collections.abc import Callable

Scope = dict[str, t.Any]
Message = dict[str, t.Any]
Receive = Callable[[], t.Awaitable[Message]]
Send = Callable[[Message], t.Awaitable[None]]
BodyRewrite = Callable[[bytes], bytes]

# Every error body, on every door: TensorFlow Serving's shape.
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def rewrite_responses(send: Send, on_start: Callable[[Message], BodyRewrite | None]) -> Send:
    """``on_start`` sees (and may edit) each response start; the body of those it returns a rewrite for is rewritten."""
    start: Message = {}
    rewrite: BodyRewrite | None = None
    chunks: list[bytes] = []

    async def send_rewritten(message: Message) -> None:
        nonlocal start, rewrite
        if message["type"] == "http.response.start":
            rewrite = on_start(message)
            if rewrite is not None:
                start = message
                return
        elif rewrite is not None and message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = rewrite(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            message = {"type": "http.response.body", "body": body}
            rewrite = None
        await send(message)

    return send_rewritten
