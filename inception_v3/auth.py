"""API keys: ``Authorization: Bearer <key>`` on HTTP, ``authorization`` metadata on gRPC.

Off unless ``services.inception_v3.auth.api_keys_file`` names a file: one key per
line (blank lines and ``#`` comments skipped), read again whenever the file
changes, so keys rotate without a restart. The guards ask ``ApiKeys.allows`` for
every route but the open ones (docs, gRPC reflection; health, the doors' probes included, and
metrics only while ``protect_health_and_metrics`` is false), so a
door added later is protected without an edit here. Keys are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from .protocols import DOORS

# Every door's probes too (``Door.health_paths``, ``Door.health_methods``).
HEALTH_HTTP_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"}).union(
    *(door.health_paths for door in DOORS)
)
HEALTH_GRPC_METHODS = frozenset().union(*(door.health_methods for door in DOORS))
DOCS_HTTP_PATHS = frozenset({"/", "/docs.json"})
DOCS_HTTP_PREFIX = "/static"
HEALTH_GRPC_PREFIX = "/grpc.health."
DOCS_GRPC_PREFIX = "/grpc.reflection."
UNAUTHORIZED = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"


class ApiKeys:
    def __init__(self, path: Path, protect_health_and_metrics: bool) -> None:
        self.path = path
        self.protect_health_and_metrics = protect_health_and_metrics
        self.version: tuple[int, int] | None = None
        self.keys: tuple[bytes, ...] = ()

    def current(self) -> tuple[bytes, ...]:
        """The file's keys, read again when its modification time or size changes (no file: no key is valid)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return ()
        if (stat.st_mtime_ns, stat.st_size) != self.version:
            lines = self.path.read_text().splitlines()
            self.keys = tuple(line.strip().encode() for line in lines if line.strip() and not line.startswith("#"))
            self.version = (stat.st_mtime_ns, stat.st_size)
        return self.keys

    def allows(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        presented = token.strip().encode()
        # Every key is compared, so the time taken tells nothing about which one nearly matched.
        matches = [hmac.compare_digest(presented, key) for key in self.current()]
        return any(matches)

    def http_path_open(self, path: str) -> bool:
        if path in DOCS_HTTP_PATHS or path.startswith(DOCS_HTTP_PREFIX):
            return True
        return path in HEALTH_HTTP_PATHS and not self.protect_health_and_metrics

    def grpc_method_open(self, method: str) -> bool:
        if method.startswith(DOCS_GRPC_PREFIX):
            return True
        health = method.startswith(HEALTH_GRPC_PREFIX) or method in HEALTH_GRPC_METHODS
        return health and not self.protect_health_and_metrics


def api_keys(path: str | None, protect_health_and_metrics: bool) -> ApiKeys | None:
    return ApiKeys(Path(path), protect_health_and_metrics) if path else None
