"""The gRPC server's Prometheus metrics at ``/metrics`` (Prometheus' default path) as well as ``/``.

A patch of BentoML 1.4.39's private internals. Its gRPC metrics server
(``bentoml_cli.worker.grpc_prometheus_server``, a process of its own that never
imports the service) asserts that every request's path is ``/``, so ``/metrics``
and any other path answered 500. ``install()``, run where the service is loaded
(``bentoml serve-grpc`` and ``start-grpc-server`` load it before they start
their workers), makes both start this module instead (the launcher starts it
itself: ``inception_v3.workers``), which runs BentoML's
metrics server with a middleware that answers ``/`` and ``/metrics`` and
gives 404 elsewhere. The server starts with ``python -m`` in whatever
directory ``serve-grpc`` ran from, so the folder holding this package goes on
its ``PYTHONPATH``; and ``serve-grpc`` (unlike ``start-grpc-server``) starts it
without the ``PROMETHEUS_MULTIPROC_DIR`` its API workers write to, so even
``/`` answered 500 there: it is set to BentoML's folder.
"""

from __future__ import annotations

import json
import os
import typing as t
from pathlib import Path

METRICS_PATHS = frozenset({"/", "/metrics"})


class MetricsAtBothPaths:
    """Stands in for BentoML's ``GenerateLatestMiddleware`` (same constructor, same answer at ``/``)."""

    def __init__(self, app: t.Callable[..., t.Awaitable[None]]) -> None:
        from bentoml._internal.configuration.containers import BentoMLContainer

        self.app = app
        self.metrics_client = BentoMLContainer.metrics_client.get()

    async def __call__(self, scope: dict[str, t.Any], receive: t.Callable, send: t.Callable) -> None:
        from starlette.responses import Response

        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        if scope["path"] in METRICS_PATHS:
            response = Response(
                self.metrics_client.generate_latest(), media_type=self.metrics_client.CONTENT_TYPE_LATEST
            )
        else:
            body = {"error": f"not found: {scope['path']}; the metrics are at /metrics"}
            response = Response(json.dumps(body), status_code=404, media_type="application/json")
        await response(scope, receive, send)


def install() -> None:
    import bentoml.serving
    import bentoml.start

    for module in (bentoml.serving, bentoml.start):
        module.SCRIPT_GRPC_PROMETHEUS_SERVER = __name__
    package_parent = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_parent not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_parent, *paths])


if __name__ == "__main__":
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.worker import grpc_prometheus_server

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", BentoMLContainer.prometheus_multiproc_dir.get())

    grpc_prometheus_server.GenerateLatestMiddleware = MetricsAtBothPaths
    grpc_prometheus_server.main()
