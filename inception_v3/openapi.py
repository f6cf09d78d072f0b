"""The OpenAPI document (``/docs.json``) that the Swagger UI at ``/`` shows.

BentoML documents its own APIs and infrastructure routes. Its page at ``/`` loads
Google Tag Manager (BentoML's web analytics) from Google, so the docs of a
self-hosted service would report every visit outside; the page is served here
without it, and asks no other host for anything. The document gets the service's
description and version instead of BentoML's boilerplate (its badges are images
from outside hosts), ``image/jpeg`` as the first
(Swagger UI's preselected) type of an image upload, error schemas without the
``detail`` field that no answer has, and the routes of the other protocols the
service speaks: a door module ``declare``s a ``Protocol`` with its ``Route``s,
and they are documented under a tag of their own.
"""

from __future__ import annotations

import json
import re
import typing as t
from dataclasses import dataclass, field
from http import HTTPStatus

from .asgi import ERROR_SCHEMA, Receive, Scope, Send, rewrite_responses

if t.TYPE_CHECKING:
    import bentoml

DOCS_PATH = "/docs.json"
UI_PATH = "/"
TAG_MANAGER = re.compile(
    rb"\s*<!-- Google Tag Manager((?: \(noscript\))?) -->.*?<!-- End Google Tag Manager\1 -->", re.DOTALL
)
FIRST_MEDIA_TYPE = "image/jpeg"
DESCRIPTION = """\
ImageNet Inception v3: send an image, get its label (and the k most probable
classes with their softmax scores), over HTTP here or gRPC on the gRPC port.

- **Service APIs**: `predict` (one image file) and `predict_batch` (base64 images),
  for BentoML's Python clients (`bentoml.SyncHTTPClient`), curl, or "Try it out" below.
- **Infrastructure**: `/livez`, `/readyz` (the model is loaded and warm), `/metrics`.
"""


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # an OpenAPI path template: "/v1/models/{model_name}:predict"
    summary: str
    response: dict[str, t.Any]  # JSON schema of the 200 answer
    request: dict[str, t.Any] | None = None  # JSON schema of the body; None: no body
    errors: tuple[int, ...] = (400, 404, 408, 413, 503, 504)


@dataclass(frozen=True)
class Protocol:
    name: str  # the tag its routes are listed under
    description: str
    routes: tuple[Route, ...]
    # name -> {"description": ..., "schema": ...} for the {placeholders} in its paths
    path_parameters: dict[str, dict[str, t.Any]] = field(default_factory=dict)


PROTOCOLS: dict[str, Protocol] = {}


def declare(protocol: Protocol) -> None:
    PROTOCOLS[protocol.name] = protocol


def error_response(status: int) -> dict[str, t.Any]:
    return {
        "description": HTTPStatus(status).phrase,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def operation(protocol: Protocol, route: Route) -> dict[str, t.Any]:
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            **protocol.path_parameters.get(name, {"schema": {"type": "string"}}),
        }
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    documented: dict[str, t.Any] = {
        "tags": [protocol.name],
        "summary": route.summary,
        "operationId": f"{protocol.name}: {route.method.upper()} {route.path}",
        "parameters": parameters,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": route.response}}},
            **{str(status): error_response(status) for status in route.errors},
        },
    }
    if route.request is not None:
        documented["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.request}}}
    return documented


def describe(spec: dict[str, t.Any], version: str) -> dict[str, t.Any]:
    protocols = "".join(f"- **{p.name}**: {p.description}\n" for p in PROTOCOLS.values())
    bento_version = spec["info"].get("version")
    spec["info"].update(
        description=DESCRIPTION + protocols,
        version=version if bento_version in (None, "None") else f"{bento_version} ({version})",
    )
    spec["info"].pop("contact", None)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Error", ERROR_SCHEMA)
    for schema in schemas.values():
        if "error" in schema.get("properties", {}):
            schema["properties"].pop("detail", None)
    for item in spec["paths"].values():
        for documented in item.values():
            content = documented.get("requestBody", {}).get("content", {})
            if FIRST_MEDIA_TYPE in content:
                documented["requestBody"]["content"] = {FIRST_MEDIA_TYPE: content.pop(FIRST_MEDIA_TYPE), **content}
    tags = spec.setdefault("tags", [])
    for protocol in PROTOCOLS.values():
        tags.append({"name": protocol.name, "description": protocol.description})
        for route in protocol.routes:
            spec["paths"].setdefault(route.path, {})[route.method] = operation(protocol, route)
    return spec


class OpenApiDocument:
    """ASGI middleware: ``/docs.json`` as ``describe`` completes it; the Swagger UI page without Tag Manager."""

    def __init__(self, app: t.Callable[[Scope, Receive, Send], t.Awaitable[None]], version: str) -> None:
        self.app = app
        self.version = version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rewrite = {DOCS_PATH: self.rewrite, UI_PATH: without_tag_manager}.get(scope.get("path", ""))
        if scope["type"] == "http" and rewrite is not None:
            send = rewrite_responses(send, lambda start: rewrite if start["status"] == 200 else None)
        await self.app(scope, receive, send)

    def rewrite(self, body: bytes) -> bytes:
        return json.dumps(describe(json.loads(body), self.version)).encode()


def without_tag_manager(page: bytes) -> bytes:
    return TAG_MANAGER.sub(b"", page)


def install(svc: bentoml.legacy.Service, bento_model: bentoml.Model) -> None:
    version = f"model {bento_model.tag}, TF Serving version {bento_model.info.metadata['serving_version']}"
    svc.add_asgi_middleware(OpenApiDocument, version=version)
