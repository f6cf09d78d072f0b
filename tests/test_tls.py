"""Issue 16: TLS on both doors from the configuration (BentoML's ``api_server.ssl``),
with certificates made here by the openssl command: the project's client and the
launcher's readiness check connect with the CA; plaintext and unknown CAs are
refused; with ``ca_certs`` and ``cert_reqs: 2`` (mutual TLS) both doors refuse
clients without a certificate from that CA."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import request_inception_v3 as client
from inception_v3 import grpc_certificates
from inception_v3.launcher import addresses, wait_ready
from inception_v3.settings import load_settings
from inception_v3.tls import ClientTls, grpc_channel
from tests.conftest import CAT_JPEG, WORK_DIR, split_address
from tests.test_faults import Stack, start_stack, stop_stack

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

CAT = CAT_JPEG.read_bytes()
CERTS = WORK_DIR / "certs"
HEALTH_REQUEST = health_pb2.HealthCheckRequest(service="bentoml.grpc.v1.BentoService")


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=CERTS)


def make_cert(name: str, ca: str, extensions: str) -> None:
    (CERTS / f"{name}.ext").write_text(extensions)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip


@pytest.fixture(scope="module")
def certs() -> Path:
    CERTS.mkdir(exist_ok=True)
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem")  # fmt: skip
    make_cert("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    make_cert("client", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert("stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return CERTS


@dataclasses.dataclass
class Secured:
    stack: Stack
    mutual: bool
    tls: ClientTls  # what a rightful client presents


@pytest.fixture(scope="module", params=["tls", "mutual-tls"])
def secured(request: pytest.FixtureRequest, certs: Path, saved_model: str) -> Iterator[Secured]:
    mutual = request.param == "mutual-tls"
    ssl_config = {"enabled": True, "certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key")}
    if mutual:
        ssl_config |= {"ca_certs": str(certs / "ca.pem"), "cert_reqs": int(ssl.CERT_REQUIRED)}
    tls = ClientTls(certs / "ca.pem", *((certs / "client.pem", certs / "client.key") if mutual else ()))
    stack = start_stack(request.param, {"api_server.ssl": ssl_config}, tls=tls)
    try:
        stack.wait_ready()
        yield Secured(stack, mutual, tls)
    finally:
        stop_stack(stack)


def grpc_health(address: str, tls: ClientTls | None) -> str:
    with grpc_channel(address, tls) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(HEALTH_REQUEST, timeout=10)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


@pytest.mark.servers
def test_the_client_connects_with_tls_on_both_doors(secured: Secured) -> None:
    stack, tls = secured.stack, secured.tls
    assert client.classify_rest(CAT, *split_address(stack.http), 60, None, tls=tls)["label"]
    assert client.classify_grpc(CAT, *split_address(stack.grpc), 60, None, tls=tls)["label"]
    arguments = ["--tls", "--ca-cert", str(tls.ca_cert), "--port"]
    if secured.mutual:
        arguments = ["--cert", str(tls.cert), "--key", str(tls.key), *arguments]
    for door, address in (("rest", stack.http), ("grpc", stack.grpc)):
        argv = ["-i", str(CAT_JPEG), "-t", "127.0.0.1", "-f", door, *arguments, address.rpartition(":")[2]]
        assert client.main(argv) == 0


@pytest.mark.servers
def test_launcher_waits_for_tls_servers(secured: Secured) -> None:
    http_port, grpc_port = (int(a.rpartition(":")[2]) for a in (secured.stack.http, secured.stack.grpc))
    settings = dataclasses.replace(load_settings(), http_port=http_port, grpc_port=grpc_port, tls=True)
    assert wait_ready(settings, timeout_s=30, tls=secured.tls)


@pytest.mark.servers
def test_plaintext_and_unknown_cas_are_refused(secured: Secured, certs: Path) -> None:
    stack = secured.stack
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{stack.http}/readyz", timeout=10)
    assert grpc_health(stack.grpc, None) == "UNAVAILABLE"
    unknown = dataclasses.replace(secured.tls, ca_cert=certs / "other-ca.pem")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{stack.http}/readyz", timeout=10, verify=unknown.ssl_context())
    assert grpc_health(stack.grpc, unknown) == "UNAVAILABLE"
    assert grpc_health(stack.grpc, secured.tls) == "SERVING"


@pytest.mark.servers
def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(secured: Secured, certs: Path) -> None:
    if not secured.mutual:
        pytest.skip("server without client certificates")
    stack = secured.stack
    stranger = ClientTls(certs / "ca.pem", certs / "stranger.pem", certs / "stranger.key")
    for presented in (ClientTls(certs / "ca.pem"), stranger):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"https://{stack.http}/readyz", timeout=10, verify=presented.ssl_context())
        assert grpc_health(stack.grpc, presented) == "UNAVAILABLE"
    verify = secured.tls.ssl_context()
    assert httpx.get(f"https://{stack.http}/readyz", timeout=10, verify=verify).status_code == 200


def test_the_grpc_server_reads_certificates_from_absolute_paths(tmp_path: Path) -> None:
    from bentoml._internal.server import grpc_app

    grpc_certificates.install()
    (tmp_path / "server.pem").write_bytes(b"certificate")
    assert grpc_app.load_from_file(str(tmp_path / "server.pem")) == b"certificate"


@pytest.mark.parametrize("tls", [False, True])
def test_make_serve_prints_the_configured_addresses(tls: bool) -> None:
    settings = dataclasses.replace(load_settings(), http_port=18501, grpc_port=18500, tls=tls)
    printed = addresses(settings)
    assert f"HTTP  {'https' if tls else 'http'}://localhost:18501  (Swagger UI at /" in printed
    assert "gRPC  localhost:18500  (bentoml.grpc.v1.BentoService" in printed
