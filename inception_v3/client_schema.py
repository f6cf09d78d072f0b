"""``/schema.json``: what BentoML's current clients read before their first call.

``bentoml.SyncHTTPClient(url)`` and ``bentoml.AsyncHTTPClient(url)`` were made
for ``@bentoml.service`` services, which publish their APIs there; a legacy
service does not, and the clients failed with "Failed to fetch schema". Each API
is described here the way a new-style service describes it (its
``Service.schema()``): the input as an object whose properties are the API
function's parameters, where an image is ``{"type": "file"}`` (so the clients
upload a path, ``pathlib.Path`` or PIL image as a multipart file), or the
function's pydantic model; the output as its pydantic model. Then
``client.predict(image=Path("cat.jpg"))`` and
``client.predict_batch(images=[...], top_k=3)`` work, positionally too.
"""

from __future__ import annotations

import inspect
import json
import typing as t

from pydantic import BaseModel
from starlette.responses import Response

from .asgi import Receive, Scope, Send
from .legacy import Image

if t.TYPE_CHECKING:
    import bentoml
    from bentoml._internal.service.inference_api import InferenceAPI

SCHEMA_PATH = "/schema.json"


def model_schema(annotation: t.Any) -> dict[str, t.Any]:
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        raise TypeError(f"an API's JSON input and output must be pydantic models, not {annotation!r}")
    return annotation.model_json_schema()


def route_schema(api: InferenceAPI[t.Any]) -> dict[str, t.Any]:
    hints = t.get_type_hints(api.func)
    (parameter,) = inspect.signature(api.func).parameters
    if isinstance(api.input, Image):
        file = {"type": "file", "format": "image", "title": parameter.title()}
        input_schema = {"type": "object", "properties": {parameter: file}, "required": [parameter]}
    else:
        input_schema = model_schema(hints[parameter])
    return {
        "name": api.name,
        "route": "/" + api.route.lstrip("/"),
        "description": api.doc,
        "batchable": False,
        "input": input_schema,
        "output": model_schema(hints["return"]),
        "is_task": False,
    }


def service_schema(svc: bentoml.legacy.Service) -> dict[str, t.Any]:
    return {"name": svc.name, "type": "service", "routes": [route_schema(api) for api in svc.apis.values()]}


class ServiceSchema:
    """ASGI middleware answering ``GET /schema.json``."""

    def __init__(self, app: t.Callable[[Scope, Receive, Send], t.Awaitable[None]], schema: dict[str, t.Any]) -> None:
        self.app = app
        self.body = json.dumps(schema).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == SCHEMA_PATH and scope["method"] == "GET":
            return await Response(self.body, media_type="application/json")(scope, receive, send)
        await self.app(scope, receive, send)


def install(svc: bentoml.legacy.Service) -> None:
    """After the APIs are defined."""
    svc.add_asgi_middleware(ServiceSchema, schema=service_schema(svc))
