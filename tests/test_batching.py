"""The batch dispatchers (inception_v3/batching.py) with a stand-in model: no servers, no TensorFlow."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import bentoml
import numpy as np
import pytest
from bentoml.exceptions import ServiceUnavailable

from inception_v3 import batching, preprocessing
from inception_v3.batching import PreviousBatchDispatcher
from inception_v3.errors import InvalidImage

COMPUTE_S = 0.05  # the stand-in model's time per batch
PATIENCE = 0.5  # of COMPUTE_S: 25 ms


def dispatcher(max_latency_ms: int = 10_000) -> tuple[Callable[[int], Awaitable[object]], list[int]]:
    """A dispatched stand-in model that doubles numbers, and the list of its batch sizes."""
    batches: list[int] = []
    cork = PreviousBatchDispatcher(
        max_latency_in_ms=max_latency_ms,
        max_batch_size=8,
        fallback=lambda: "overloaded",
        get_batch_size=lambda _: 1,
    )
    cork.patience = PATIENCE

    async def model(items: tuple[int, ...]) -> list[int]:
        batches.append(len(items))
        await asyncio.sleep(COMPUTE_S)
        return [2 * item for item in items]

    return cork(model), batches


async def timed(call: Awaitable[object]) -> tuple[object, float]:
    start = time.perf_counter()
    return await call, time.perf_counter() - start


def test_a_lone_request_goes_at_once() -> None:
    async def scenario() -> None:
        classify, batches = dispatcher()
        for number in range(3):
            answer, seconds = await timed(classify(number))
            assert answer == 2 * number
            assert seconds < COMPUTE_S + 0.015
        assert batches == [1, 1, 1]

    asyncio.run(scenario())


def test_clients_that_come_back_together_are_batched_together() -> None:
    async def client(classify: Callable[[int], Awaitable[object]], number: int) -> list[object]:
        answers = []
        for _ in range(5):
            await asyncio.sleep(0.002 * number)  # clients come back a few ms apart
            answers.append(await classify(number))
        return answers

    async def scenario() -> None:
        classify, batches = dispatcher()
        answers = await asyncio.gather(*(client(classify, number) for number in range(6)))
        assert answers == [[2 * number] * 5 for number in range(6)]
        # The first request comes alone (no previous batch to wait for) and the five others
        # queue behind it; from then on all six go together, until the first client, which
        # never waits, is done. BentoML's own dispatcher gives [1, 5, 1, 6, 1, 5, ...] here.
        assert batches == [1, 6, 6, 6, 6, 5]

    asyncio.run(scenario())


def test_the_wait_for_batch_mates_is_bounded_by_patience() -> None:
    async def scenario() -> None:
        classify, batches = dispatcher()
        await asyncio.gather(*(classify(number) for number in range(4)))
        _, seconds = await timed(classify(9))  # the three others never come back
        assert batches == [4, 1]
        assert COMPUTE_S + 0.8 * PATIENCE * COMPUTE_S <= seconds < COMPUTE_S + PATIENCE * COMPUTE_S + 0.02
        _, seconds = await timed(classify(9))  # the previous batch held one: no wait
        assert seconds < COMPUTE_S + 0.015

    asyncio.run(scenario())


def test_a_request_queued_past_max_latency_gets_the_fallback() -> None:
    async def scenario() -> None:
        classify, batches = dispatcher(max_latency_ms=20)
        running = asyncio.ensure_future(classify(2))
        await asyncio.sleep(0.005)
        assert await classify(3) == "overloaded"  # queued behind the running batch for > 20 ms
        assert await running == 4
        assert batches == [1]

    asyncio.run(scenario())


class Doubler(bentoml.legacy.Runnable):
    """A stand-in for the model: doubles its rows, says how many a call held and which call it was."""

    SUPPORTED_RESOURCES = ("cpu",)
    SUPPORTS_CPU_MULTI_THREADING = True

    def __init__(self) -> None:
        self.calls: list[int] = []

    @bentoml.legacy.Runnable.method(batchable=True, batch_dim=0)
    def double(self, rows: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(rows))
        time.sleep(COMPUTE_S)
        return 2 * rows, np.full(len(rows), len(self.calls))

    @bentoml.legacy.Runnable.method(batchable=True, batch_dim=0)
    def fail(self, rows: np.ndarray) -> np.ndarray:
        raise ValueError(f"no good: {len(rows)} rows")


def embedded_runner(max_latency_ms: int = 10_000, patience: float = PATIENCE) -> tuple[bentoml.legacy.Runner, Doubler]:
    batching.install(PATIENCE, patience)
    runner = bentoml.legacy.Runner(
        Doubler, name="doubler", embedded=True, max_batch_size=8, max_latency_ms=max_latency_ms
    )
    runner.init_local(quiet=True)
    return runner, runner._runner_handle._runnable


def test_an_embedded_runner_batches_concurrent_calls_and_gives_each_its_own_rows() -> None:
    async def scenario() -> None:
        runner, doubler = embedded_runner()
        sizes = [1, 3, 1, 2, 6, 1]  # queued at once: 1 + 3 + 1 + 2, then 6 + 1 (a call is never split)
        answers = await asyncio.gather(
            *(runner.double.async_run(np.full(size, number), np.zeros(size)) for number, size in enumerate(sizes))
        )
        for number, (size, (rows, call)) in enumerate(zip(sizes, answers, strict=True)):
            assert rows.tolist() == [2 * number] * size
            assert len(set(call.tolist())) == 1
        assert doubler.calls == [7, 7]
        ((rows, _),) = await asyncio.gather(runner.double.async_run(np.arange(12), np.zeros(12)))
        assert rows.tolist() == list(range(0, 24, 2))  # larger than a batch: whole, in one call
        assert doubler.calls[-1] == 12

    asyncio.run(scenario())


def test_an_embedded_runner_gives_every_call_of_a_failed_batch_its_error_and_503_past_max_latency() -> None:
    async def scenario() -> None:
        runner, _ = embedded_runner(max_latency_ms=20)
        failures = await asyncio.gather(*(runner.fail.async_run(np.zeros(2)) for _ in range(3)), return_exceptions=True)
        assert [str(error) for error in failures] == ["no good: 6 rows"] * 3  # one batch, its error to each call
        running = asyncio.ensure_future(runner.double.async_run(np.zeros(1), np.zeros(1)))
        await asyncio.sleep(0.005)
        with pytest.raises(ServiceUnavailable, match="max_latency_ms"):
            await runner.double.async_run(np.zeros(1), np.zeros(1))  # queued behind it for > 20 ms
        await running

    asyncio.run(scenario())


async def decoded_request(runner: bentoml.legacy.Runner, decode_s: float) -> object:
    """30 ms in, an image decoded in ``decode_s`` (``prepare_image`` stood in for), then ``double`` of it."""
    await asyncio.sleep(0.03)
    return await runner.double.async_run(await preprocessing.read_image(decode_s), np.zeros(1))


@pytest.mark.parametrize(("decode_s", "batches"), [(0.04, [1, 2]), (0.3, [1, 1, 1])])
def test_an_embedded_batch_waits_for_the_images_being_decoded_within_patience(
    monkeypatch, decode_s: float, batches: list[int]
) -> None:
    """A batch of one runs; meanwhile two requests arrive, one decoded in 5 ms, one in ``decode_s``.
    The next batch waits for the second while it is decoded, at most 2 x the previous batch's 50 ms."""
    monkeypatch.setattr(preprocessing, "prepare_image", lambda seconds, limits: time.sleep(seconds) or np.ones(1))

    async def scenario() -> None:
        runner, doubler = embedded_runner(patience=2.0)
        request = functools.partial(decoded_request, runner)
        await asyncio.gather(runner.double.async_run(np.zeros(1), np.zeros(1)), request(0.005), request(decode_s))
        assert doubler.calls == batches
        assert preprocessing.decoding == 0

    asyncio.run(scenario())


def test_an_embedded_batch_waiting_for_an_image_goes_as_soon_as_its_decoding_fails(monkeypatch) -> None:
    """As above, the second image's decoding failing after 40 ms: the next batch goes then (about 70 ms
    in), not when the patience runs out (at 150 ms)."""

    def prepare(seconds: float, limits: object) -> np.ndarray:
        time.sleep(seconds)
        if seconds > 0.01:
            raise InvalidImage("corrupt")
        return np.ones(1)

    monkeypatch.setattr(preprocessing, "prepare_image", prepare)

    async def scenario() -> None:
        runner, doubler = embedded_runner(patience=2.0)
        request = functools.partial(decoded_request, runner)
        _, answered, failed = await asyncio.gather(
            runner.double.async_run(np.zeros(1), np.zeros(1)),
            timed(request(0.005)),
            request(0.04),
            return_exceptions=True,
        )
        assert isinstance(failed, InvalidImage)
        assert doubler.calls == [1, 1]
        assert answered[1] < 0.03 + 0.04 + COMPUTE_S + 0.04  # from its start: not 0.03 + 0.12 + COMPUTE_S

    asyncio.run(scenario())
