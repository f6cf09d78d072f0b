"""Issue 16: refusals reach every client. A body refused with 413 before it is read is
read and dropped (a lingering close), so Python's urllib reads the 413 instead of a
reset; gRPC health says NOT_SERVING once the drain starts or while the runner is away."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from grpc_health.v1 import health_pb2

from inception_v3.availability import RunnerWatch
from inception_v3.guards import Admission, GrpcGuard
from inception_v3.settings import load_settings


@pytest.mark.servers
def test_urllib_reads_the_413_of_a_body_refused_before_it_is_read(http_address: str) -> None:
    body = b"\xff\xd8" + b"\0" * (60 << 20)  # 60 MiB, three times the limit
    request = urllib.request.Request(
        f"http://{http_address}/predict", data=body, headers={"Content-Type": "image/jpeg"}
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 413
    assert f"{load_settings().max_body_bytes}-byte limit" in json.loads(raised.value.read())["error"]


class Runner:
    def __init__(self, ready: bool) -> None:
        self.ready = ready

    async def runner_handle_is_ready(self, _timeout: float) -> bool:
        return self.ready


class Context:
    def invocation_metadata(self) -> tuple:
        return ()


@pytest.mark.parametrize(
    ("draining", "runner_ready", "expected"),
    [
        (False, True, health_pb2.HealthCheckResponse.SERVING),
        (True, True, health_pb2.HealthCheckResponse.NOT_SERVING),
        (False, False, health_pb2.HealthCheckResponse.NOT_SERVING),
    ],
)
def test_grpc_health_says_not_serving_while_draining_or_without_runner(
    draining: bool, runner_ready: bool, expected: int
) -> None:
    async def check() -> int:
        admission = Admission("grpc", 1, 1, RunnerWatch([Runner(runner_ready)]))
        admission.draining = draining

        async def servicer(_request: object, _context: object) -> health_pb2.HealthCheckResponse:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

        guard = GrpcGuard(admission, timeout_s=1, retry_after_s=1, keys=None)
        answer = await guard.health_check(servicer)(health_pb2.HealthCheckRequest(), Context())
        if admission.runner.task:
            admission.runner.task.cancel()
        return answer.status

    assert asyncio.run(check()) == expected
