"""Let BentoML's gRPC server read its TLS files from any path (a patch of BentoML 1.4.39).

``bentoml._internal.server.grpc_app.Server.configure_port`` reads the
``api_server.ssl`` files with ``bentoml.grpc.utils.load_from_file``, which refuses
absolute paths and anything outside the working directory (a check meant for paths
that come from requests), so a certificate mounted at ``/certs`` (a Kubernetes Secret)
stopped the gRPC server while the HTTP server took it. These paths come from the
operator's configuration: the gRPC server reads them as given, relative ones from the
working directory, as the HTTP server does. ``tests/test_tls.py`` serves certificates
from absolute paths, and fails if this stops taking effect.
"""

from __future__ import annotations

from pathlib import Path

from bentoml._internal.server import grpc_app


def read_file(path: str) -> bytes:
    return Path(path).expanduser().read_bytes()


def install() -> None:
    grpc_app.load_from_file = read_file
