"""What the servers tell operators: metrics, request ids in log lines, quieter client errors.

Metrics: BentoML's own HTTP metrics do not see the answers ``guards`` gives
before a request reaches an API (413, 503), and its gRPC metrics count a call
before it has run, so every call counts as "OK" or "500". The guards record each
request here instead, on both doors, with the status the client really got (the
timeout's 408 or 504 too; "cancelled": the client left before its answer):

    inception_v3_requests_total{protocol, endpoint, status}
    inception_v3_request_duration_seconds{protocol, endpoint, status}   (histogram)
    inception_v3_in_flight{protocol}    requests being served now
    inception_v3_queued{protocol}       requests waiting for a slot now
    inception_v3_engine{engine, precision, device, cpu_flags}   1, set by the runner

The servers' multiprocess metrics directory (``PROMETHEUS_MULTIPROC_DIR``, set
by BentoML for every server it starts) gathers them with BentoML's own, so HTTP
``/metrics`` and the gRPC metrics port both show them, next to the runner's
``bentoml_runner_adaptive_batch_size`` (batch sizes). Tracing is BentoML's
OpenTelemetry instrumentation, set in the configuration file's ``tracing`` section.

Logs: every line written while a request is served names its request id
(``request_id=...``, the ``X-Request-ID`` header or ``x-request-id`` metadata, or
a new one), and the answer carries it back: in its headers, or its trailing metadata.
BentoML logs every 4xx as an ERROR with a traceback; those become one INFO line.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import typing as t
import uuid
from http import HTTPStatus

from bentoml.exceptions import BentoMLException

if t.TYPE_CHECKING:
    from .engines import Choice

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
REQUEST_ID_KEY = "x-request-id"  # the HTTP header and the gRPC metadata key, both ways
REQUEST_ID_SENT = re.compile(r"[\x20-\x7e]{1,128}")  # printable ASCII: what gRPC metadata and a log line carry


def request_id_from(sent: str) -> str:
    """The client's request id, cut to 128 characters, or a new one where it sent none or one
    gRPC cannot send back (another byte made grpcio drop the call's answer)."""
    return sent[:128] if REQUEST_ID_SENT.fullmatch(sent[:128]) else uuid.uuid4().hex


def add_trailing_metadata(context: t.Any, *pairs: tuple[str, str]) -> None:
    """Beside what the call's answer carries already (its request id): gRPC's own setter replaces it all."""
    context.set_trailing_metadata((*(context.trailing_metadata() or ()), *pairs))


# Loggers whose "Exception on <api>" records carry client errors (4xx) as tracebacks.
BENTOML_API_LOGGERS = ("bentoml._internal.server.http_app", "bentoml._internal.server.grpc.servicer.v1")
# Answers the client caused, or that tell it to retry (the runner restarting): no traceback.
QUIET_STATUSES = {*range(400, 500), HTTPStatus.SERVICE_UNAVAILABLE}
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        # Imported here, in the server worker: prometheus_client picks its
        # multiprocess mode from the environment when it is first imported.
        import prometheus_client as prom

        # registry=None: in multiprocess mode the metrics directory is what /metrics reads.
        self.requests = prom.Counter(
            "inception_v3_requests",
            "Requests answered, by door, endpoint and status (HTTP code or gRPC status name)",
            ["protocol", "endpoint", "status"],
            registry=None,
        )
        self.duration = prom.Histogram(
            "inception_v3_request_duration_seconds",
            "Time from a request's arrival to its answer, queueing included",
            ["protocol", "endpoint", "status"],
            buckets=DURATION_BUCKETS_S,
            registry=None,
        )
        self.in_flight = prom.Gauge(
            "inception_v3_in_flight",
            "Requests being served now",
            ["protocol"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.queued = prom.Gauge(
            "inception_v3_queued",
            "Requests waiting for a slot now",
            ["protocol"],
            multiprocess_mode="livesum",
            registry=None,
        )

        self.engine = prom.Gauge(
            "inception_v3_engine",
            "1 for what runs the model: engine, precision, device and the CPU's relevant flags",
            ["engine", "precision", "device", "cpu_flags"],
            multiprocess_mode="max",
            registry=None,
        )

    def engine_in_use(self, choice: Choice) -> None:
        self.engine.labels(choice.engine, choice.precision, choice.device, " ".join(choice.cpu_flags)).set(1)

    def answered(self, protocol: str, endpoint: str, status: str, duration_s: float) -> None:
        self.requests.labels(protocol, endpoint, status).inc()
        self.duration.labels(protocol, endpoint, status).observe(duration_s)


@functools.cache
def metrics() -> Metrics:
    return Metrics()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id=...`` to the trace part of BentoML's log format.

    A handler filter: logger filters do not see records from child loggers. It
    runs after BentoML's ``TraceRecordFilter``, which sets ``trace_msg``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid:
            trace = getattr(record, "trace_msg", "")
            record.trace_msg = f"{trace[:-1]},request_id={rid})" if trace else f" (request_id={rid})"
        return True


class ClientErrorFilter(logging.Filter):
    """BentoML's ERROR-with-traceback for a 4xx or 503 answer becomes one INFO line with the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BentoMLException) and error.error_code in QUIET_STATUSES:
            where = record.getMessage().removeprefix("Exception on ")
            kind = "client error" if error.error_code < HTTPStatus.INTERNAL_SERVER_ERROR else "unavailable"
            record.msg = f"{kind} on {where}: {int(error.error_code)} {error.message}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure_logging() -> None:
    """Attach the filters; BentoML has configured its handlers by the time the service is imported."""
    handlers: set[logging.Handler] = set()
    for name in (None, "bentoml", "bentoml.access", *BENTOML_API_LOGGERS):
        handlers.update(logging.getLogger(name).handlers)
    for handler in handlers:
        add_once(handler, RequestIdFilter)
    for name in BENTOML_API_LOGGERS:
        add_once(logging.getLogger(name), ClientErrorFilter)
    # The project's own INFO lines (the runner's "loaded ... on the CPU") reach those handlers too.
    logging.getLogger(__package__).setLevel(logging.INFO)


def add_once(target: logging.Filterer, filter_class: type[logging.Filter]) -> None:
    if not any(isinstance(existing, filter_class) for existing in t.cast(list, target.filters)):
        target.addFilter(filter_class())
