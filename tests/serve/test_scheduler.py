"""The engine without gRPC: batch splitting, cancellation, per-call size caps, one-character jobs riding
in the step call, onnxruntime failures confined to their own call, and park hysteresis."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from serve.engine.protocol import Finish, SamplingParams
from serve.engine.scheduler import MAX_CALL_CHARS, _group
from serve.api.status import status_of
from serve.errors import EngineFailure
from serve.engine.runtime import Runtime
from serve.engine.thread import ThreadEngine


@pytest.fixture(scope="module")
def runtime(text_model) -> Runtime:
    return Runtime(text_model, "cpu")


def run(engine: ThreadEngine, coroutine_factory):
    async def main():
        engine.start(asyncio.get_running_loop())
        try:
            return await coroutine_factory()
        finally:
            engine.stop()
    return asyncio.run(main())


async def collect(engine: ThreadEngine, prompt: np.ndarray, seed: int, n: int) -> list[tuple[int, float, Finish]]:
    stream = engine.generate(prompt, SamplingParams(seed=seed), n)
    try:
        return [item async for item in stream]
    finally:
        stream.close()


def test_max_batch_splits_the_step_but_not_the_results(runtime):
    prompts = [np.array([1, 2, 3][: 1 + i % 3], dtype=np.int64) for i in range(5)]

    def many(engine):
        return run(engine, lambda: asyncio.gather(*(collect(engine, p, i, 40) for i, p in enumerate(prompts))))

    wide, narrow = ThreadEngine(runtime, max_batch=256), ThreadEngine(runtime, max_batch=2)
    parking = ThreadEngine(runtime, window=1)
    expected = many(wide)
    assert many(narrow) == expected
    assert many(parking) == expected  # streams parked and re-batched every character keep their state
    assert narrow.stats["step_calls"] >= 3 * 39 and wide.stats["step_calls"] < 3 * 39
    assert all(r[-1][2] is Finish.LENGTH for r in many(ThreadEngine(runtime)))


def test_cancelled_streams_leave_the_batch(runtime):
    # a window wider than the stream: it is never parked, so only close() can take it out of the engine
    engine = ThreadEngine(runtime, window=10_000_000)

    def cancelled() -> float:
        return engine.metrics.registry.get_sample_value("charrnn_cancelled_streams_total")

    async def scenario():
        stream = engine.generate(np.array([1], dtype=np.int64), SamplingParams(seed=1), 10_000_000)
        await stream.__anext__()
        await asyncio.sleep(0.05)
        running = engine.stats["step_rows"]
        stream.close()
        for _ in range(100):  # the engine drops it at its next step: wait for that, at most 5 s
            if cancelled():
                break
            await asyncio.sleep(0.05)
        counted = cancelled()  # before stop(), which counts the streams it cuts
        after = [engine.stats["step_rows"]]
        await asyncio.sleep(0.05)
        after.append(engine.stats["step_rows"])
        rest = await collect(engine, np.array([2], dtype=np.int64), 2, 30)
        return running, after, counted, rest

    running, after, counted, rest = run(engine, scenario)
    assert running > 0  # it was being stepped, unparked, when closed
    assert after[0] == after[1], after  # no more steps for it after close()
    assert counted == 1
    assert len(rest) == 30 and cancelled() == 1  # the engine keeps serving; nothing left to cut at stop


def test_an_onnxruntime_failure_fails_the_batch_and_the_engine_keeps_serving(runtime):
    engine = ThreadEngine(Wrapped(runtime, fail_step_calls=1))  # type: ignore[arg-type]

    async def scenario():
        with pytest.raises(EngineFailure):
            await collect(engine, np.array([1], dtype=np.int64), 1, 10)
        return await collect(engine, np.array([1], dtype=np.int64), 1, 10)

    assert len(run(engine, scenario)) == 10


class Wrapped:
    """A real runtime whose calls can be counted or made to fail."""

    def __init__(self, runtime: Runtime, fail_step_calls: int = 0, fail_prefill_len: int | None = None) -> None:
        self._runtime = runtime
        self.spec = runtime.spec
        self.fail_step_calls = fail_step_calls
        self.fail_prefill_len = fail_prefill_len
        self.uploads = 0

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def run(self, ids, state):
        if ids.shape[1] == self.fail_prefill_len:
            raise RuntimeError("simulated onnxruntime failure")
        return self._runtime.run(ids, state)

    def step(self, ids, state):
        if self.fail_step_calls:
            self.fail_step_calls -= 1
            raise RuntimeError("simulated onnxruntime failure")
        return self._runtime.step(ids, state)

    def upload(self, state):
        self.uploads += 1
        return self._runtime.upload(state)


async def _text(engine: ThreadEngine, prompt: list[int], seed: int, n: int, pause: float = 0.0) -> list[int]:
    stream = engine.generate(np.array(prompt, dtype=np.int64), SamplingParams(seed=seed), n)
    out = []
    try:
        async for token, _, _ in stream:
            out.append(token)
            if pause:
                await asyncio.sleep(pause)
    finally:
        stream.close()
    return out


def test_calls_are_capped_in_characters_as_well_as_rows():
    long = [np.zeros(10_000)] * 10
    chunks = _group(long, len, 256)
    assert [len(c) for c in chunks] == [6, 4]  # 6 x 10,000 <= MAX_CALL_CHARS < 7 x 10,000
    assert all(len(c) * 10_000 <= MAX_CALL_CHARS for c in chunks)
    assert [len(c) for c in _group([np.zeros(3)] * 300, len, 256)] == [256, 44]
    assert [len(c) for c in _group([np.zeros(MAX_CALL_CHARS * 2)], len, 256)] == [1]


def test_a_failed_step_call_fails_only_its_own_batch(runtime):
    reference_engine = ThreadEngine(runtime)
    expected = run(reference_engine, lambda: _text(reference_engine, [2], 7, 20))

    engine = ThreadEngine(Wrapped(runtime, fail_step_calls=1), max_batch=1)  # type: ignore[arg-type]

    async def scenario():
        first = asyncio.ensure_future(_text(engine, [1], 1, 20))
        second = asyncio.ensure_future(_text(engine, [2], 7, 20))
        return await asyncio.gather(first, second, return_exceptions=True)

    first, second = run(engine, scenario)
    assert isinstance(first, EngineFailure)  # the first step call (its batch of one) failed
    assert second == expected  # the other batch never noticed


def test_a_failed_prefill_fails_only_its_own_group(runtime):
    reference_engine = ThreadEngine(runtime)
    expected = run(reference_engine, lambda: _text(reference_engine, [3], 5, 15))
    engine = ThreadEngine(Wrapped(runtime, fail_prefill_len=2))  # type: ignore[arg-type]

    async def scenario():
        return await asyncio.gather(_text(engine, [1, 2], 1, 15), _text(engine, [3], 5, 15),
                                    return_exceptions=True)

    broken, fine = run(engine, scenario)
    assert isinstance(broken, EngineFailure)
    assert fine == expected


def test_engine_failures_reach_clients_as_unavailable():
    assert status_of(EngineFailure("model execution failed")) == (
        grpc.StatusCode.UNAVAILABLE, "model execution failed")


def test_a_slow_consumer_does_not_rebuild_the_batch_every_character(runtime):
    wrapped = Wrapped(runtime)
    engine = ThreadEngine(wrapped, window=8)  # type: ignore[arg-type]
    reference_engine = ThreadEngine(runtime)
    expected = run(reference_engine, lambda: _text(reference_engine, [1], 3, 160))
    assert run(engine, lambda: _text(engine, [1], 3, 160, pause=0.002)) == expected
    # Parking at 8 behind and rejoining at 4 behind re-forms the batch at most once per 4 characters
    # (31 times measured); rejoining as soon as the lag dropped below 8 re-formed it 62 times.
    assert wrapped.uploads <= 160 // 4 + 4, wrapped.uploads


def test_one_character_predict_rides_in_the_step_call_with_the_same_results(runtime):
    idle = ThreadEngine(runtime)
    texts = [[1], [2], [3], [4]]

    async def alone():
        return [await idle.predict(np.array(t, dtype=np.int64), None) for t in texts]

    expected = run(idle, alone)
    assert idle.stats["rider_rows"] == 0

    busy = ThreadEngine(runtime)

    async def beside_a_stream():
        stream = busy.generate(np.array([1], dtype=np.int64), SamplingParams(seed=1), 100_000)
        await stream.__anext__()  # the stream is in the step batch now
        try:
            return await asyncio.gather(*(busy.predict(np.array(t, dtype=np.int64), None) for t in texts))
        finally:
            stream.close()

    got = run(busy, beside_a_stream)
    assert busy.stats["rider_rows"] == len(texts) and busy.stats["job_calls"] == 0
    for (want_logits, want_state), (logits, state) in zip(expected, got):
        assert logits.shape == want_logits.shape and state.shape == want_state.shape
        np.testing.assert_allclose(logits, want_logits, atol=1e-5)
        np.testing.assert_allclose(state, want_state, atol=1e-5)


def test_a_job_whose_caller_left_is_dropped_before_its_call(runtime):
    """While the worker is busy with one job, a second one's caller gives up: the second is never run."""
    class Slow(Wrapped):
        def run(self, ids, state):
            time.sleep(0.3)
            return super().run(ids, state)

    engine = ThreadEngine(Slow(runtime))  # type: ignore[arg-type]

    async def scenario():
        busy = asyncio.ensure_future(engine.predict(np.array([1, 2], dtype=np.int64), None))
        await asyncio.sleep(0.1)  # the worker is inside the first call now
        gone = asyncio.ensure_future(engine.predict(np.array([3, 4], dtype=np.int64), None))
        await asyncio.sleep(0)
        gone.cancel()
        await busy
        return await engine.predict(np.array([1], dtype=np.int64), None)

    run(engine, scenario)
    assert engine.stats["dropped_jobs"] == 1 and engine.stats["job_calls"] == 2
