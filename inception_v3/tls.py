"""A client's side of TLS on both doors (the servers' side is BentoML's ``api_server.ssl``).

Used by the project's client and by the launcher's readiness check: the CA that
signed the servers' certificate (None: the system's CAs) and, for servers that
ask for client certificates (mutual TLS), this client's certificate and key.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientTls:
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_cert)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca_cert), read(self.key), read(self.cert))


def grpc_channel(address: str, tls: ClientTls | None) -> grpc.Channel:
    return grpc.secure_channel(address, tls.grpc_credentials()) if tls else grpc.insecure_channel(address)


def http_url(address: str, tls: ClientTls | None) -> str:
    return f"{'https' if tls else 'http'}://{address}"
