"""The doors beside BentoML's own APIs: one module per wire protocol, one contract.

A door is a module that speaks someone else's protocol on the service's two
servers and declares a ``Door``:

- ``rest_prefix``: where its Starlette app is mounted on the HTTP server;
  ``guards`` labels every request under it ``metrics_endpoint`` (a bounded label).
- ``health_paths`` (HTTP) and ``health_methods`` (gRPC, full method names): probes
  that ``guards`` lets through without admission, so an overloaded server still
  answers its orchestrator.
- ``grpc_services``: the services it adds to the gRPC server (and its reflection list).
- ``install(svc, classifier)``: mount it all. ``classifier`` (``inception_v3.classifier``)
  is the service's protocol-neutral path from image files to an ``(n, 1000)`` float32
  array of probabilities, with the class names and what the model is, so every door
  shares the runner, its batches and its limits, and the same bytes get the same
  answer on every door.

A door's model (``VersionedModel``) words "no such version" its protocol's way
(``not_found``); ``versioned`` and ``available`` then answer in those words.

Adding a protocol is adding a module with a ``DOOR`` and listing it in ``DOORS``.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

if t.TYPE_CHECKING:
    import bentoml

    from ..classifier import Classifier
    from ..errors import ModelNotFound

Install = t.Callable[["bentoml.legacy.Service", "Classifier"], None]


@dataclass(frozen=True)
class Door:
    name: str
    rest_prefix: str
    metrics_endpoint: str
    health_paths: frozenset[str]
    health_methods: frozenset[str]
    grpc_services: tuple[str, ...]
    install: Install

    def serves(self, path: str) -> bool:
        return path == self.rest_prefix or path.startswith(self.rest_prefix + "/")


class VersionedModel:
    """The model as a door's clients see it: a name, and the classifier's versions."""

    def __init__(self, name: str, classifier: Classifier) -> None:
        self.name = name
        self.classifier = classifier

    def not_found(self, version: int | None) -> ModelNotFound:
        raise NotImplementedError

    def versioned(self, version: int | None) -> t.AsyncContextManager[None]:
        return self.classifier.versioned(version, self.not_found)

    async def available(self, version: int | None) -> dict[str, t.Any]:
        async with self.versioned(version):
            return await self.classifier.available(version)


from . import kserve_v2, tfserving  # noqa: E402 (they import ``Door`` from here)

DOORS: tuple[Door, ...] = (tfserving.DOOR, kserve_v2.DOOR)


def install(svc: bentoml.legacy.Service, classifier: Classifier) -> None:
    for door in DOORS:
        door.install(svc, classifier)
