"""The project's settings, read from the same YAML file BentoML reads.

BentoML takes its own sections (ports, workers, batching, timeouts) from the file
named by ``BENTOML_CONFIG``; the project's limits live in that file too, under
``services.inception_v3`` (BentoML's v1 schema leaves that section free-form).
"""

from __future__ import annotations

import functools
import os
import socket
import typing as t
from dataclasses import dataclass
from pathlib import Path

import yaml

from .engines import engine_here
from .preprocessing import DecodeLimits
from .versions import VersionPolicy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "configuration.yaml"
SERVICE_NAME = "inception_v3"
RUNNER_MODES = ("auto", "shared", "embedded")


@dataclass(frozen=True)
class HeadLimits:
    """An HTTP request's head (request line and headers), before the guard sees it (``http_parser``)."""

    timeout_s: float = 20
    max_bytes: int = 64 << 10


@dataclass(frozen=True)
class Settings:
    model_tag: str
    model_store: str | None  # a model store directory to watch instead of BentoML's (a mounted volume)
    model_poll_s: float
    version_policy: VersionPolicy
    http_host: str
    http_port: int
    grpc_port: int
    api_workers: int
    grpc_metrics_port: int
    runner_port: int
    runner: str  # as configured: auto, shared or embedded (see embedded_runner)
    default_top_k: int
    max_body_bytes: int
    decode_limits: DecodeLimits
    head_limits: HeadLimits
    max_images_per_request: int
    request_timeout_s: float
    max_concurrency: int
    max_queue: int
    retry_after_s: int
    batch_patience: float
    embedded_batch_patience: float
    engine: str
    precision: str
    xla_batch_sizes: tuple[int, ...]
    openvino_batch_limit: int | str  # images per part, or auto (engines.openvino.part_size)
    api_keys_file: str | None
    protect_health_and_metrics: bool
    tls: bool  # api_server.ssl.enabled: both doors serve TLS only
    tls_ca_certs: str | None  # api_server.ssl.ca_certs: the CA of client certificates (mutual TLS)
    config_file: Path

    @property
    def embedded_runner(self) -> bool:
        """A model in each API server, batching that server's requests; else one runner on ``runner_port``.

        ``auto``: embedded for the OpenVINO engine (the CPU), shared for TensorFlow (a GPU wants one
        batching queue for both doors, and TensorFlow in each door would be two copies of it).
        """
        if self.runner == "auto":
            return engine_here(self.engine) == "openvino"
        return self.runner == "embedded"


def config_file() -> Path:
    return Path(os.environ.get("BENTOML_CONFIG", DEFAULT_CONFIG_FILE))


def use_project_config_by_default() -> None:
    """Without ``BENTOML_CONFIG``, serve with ``configuration.yaml``, not BentoML's defaults (:3000, a worker per core).

    BentoML reads its configuration when it is imported, before it loads the
    service, so it is read again here. ``bentoml serve`` looks up ports and
    workers after loading the service, and its workers inherit the variable.
    ``bentoml serve-grpc`` fixed its defaults before: it needs the variable set.
    """
    if "BENTOML_CONFIG" not in os.environ:
        import bentoml

        os.environ["BENTOML_CONFIG"] = str(DEFAULT_CONFIG_FILE)
        bentoml.load_config(str(DEFAULT_CONFIG_FILE))


@functools.cache
def load_settings() -> Settings:
    return read_settings(config_file())


def read_settings(path: Path) -> Settings:
    config = yaml.safe_load(path.read_text())
    api_server = config["api_server"]
    own = config["services"][SERVICE_NAME]
    auth = own.get("auth") or {}
    tls = api_server.get("ssl") or {}
    return Settings(
        model_tag=os.environ.get("INCEPTION_V3_MODEL_TAG", own["model_tag"]),
        model_store=os.environ.get("INCEPTION_V3_MODEL_STORE", own.get("model_store")) or None,
        model_poll_s=float(own["model_poll_s"]),
        version_policy=VersionPolicy.parse(own.get("model_version_policy")),
        http_host=api_server["http"]["host"],
        http_port=api_server["http"]["port"],
        grpc_port=api_server["grpc"]["port"],
        api_workers=api_server["workers"],
        grpc_metrics_port=api_server["grpc"]["metrics"]["port"],
        runner_port=own["runner_port"],
        runner=runner_mode(os.environ.get("INCEPTION_V3_RUNNER", own.get("runner", "auto"))),
        default_top_k=own["default_top_k"],
        max_body_bytes=own["max_body_bytes"],
        decode_limits=DecodeLimits(
            max_image_pixels=own["max_image_pixels"],
            max_jpeg_pixels=own["max_jpeg_pixels"],
            max_jpeg_scans=own.get("max_jpeg_scans", DecodeLimits.max_jpeg_scans),
        ),
        head_limits=HeadLimits(
            timeout_s=own.get("head_timeout_s", HeadLimits.timeout_s),
            max_bytes=own.get("max_head_bytes", HeadLimits.max_bytes),
        ),
        max_images_per_request=own["max_images_per_request"],
        request_timeout_s=api_server["traffic"]["timeout"],
        max_concurrency=own["max_concurrency"],
        max_queue=own["max_queue"],
        retry_after_s=own["retry_after_s"],
        batch_patience=own["batch_patience"],
        embedded_batch_patience=own["embedded_batch_patience"],
        engine=own["engine"],
        precision=own["precision"],
        xla_batch_sizes=tuple(own["xla_batch_sizes"]),
        openvino_batch_limit=batch_limit(own["openvino_batch_limit"]),
        api_keys_file=auth.get("api_keys_file"),
        protect_health_and_metrics=bool(auth.get("protect_health_and_metrics")),
        tls=bool(tls.get("enabled")),
        tls_ca_certs=tls.get("ca_certs"),
        config_file=path,
    )


def runner_mode(value: str) -> str:
    if value not in RUNNER_MODES:
        raise ValueError(f"services.{SERVICE_NAME}.runner is {value!r}: it must be one of {', '.join(RUNNER_MODES)}")
    return value


def batch_limit(value: t.Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(
        f"services.{SERVICE_NAME}.openvino_batch_limit is {value!r}: it must be auto or a count (0: whole)"
    )


def write_config_on_free_ports(path: Path, overrides: dict[str, t.Any] | None = None) -> Path:
    """A copy of the configuration with every port moved to a free one, for tests and the benchmark.

    Servers started from one file bind the same ports (the gRPC metrics port too), so
    servers that run at the same time each need a file of their own. ``overrides``
    maps dotted keys (``"api_server.http.host"``) to values.
    """
    config = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    ports = {
        "api_server.http.port": free_port(),
        "api_server.grpc.port": free_port(),
        "api_server.grpc.metrics.port": free_port(),
        f"services.{SERVICE_NAME}.runner_port": free_port(),
    }
    for key, value in {**ports, **(overrides or {})}.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
