"""The engine without gRPC: batch splitting, cancellation, and surviving an onnxruntime failure."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.batcher import Engine, EngineFailure, Finish, SamplingParams
from serve.runtime import Runtime


@pytest.fixture(scope="module")
def runtime(text_model) -> Runtime:
    return Runtime(text_model, "cpu")


def run(engine: Engine, coroutine_factory):
    async def main():
        engine.start(asyncio.get_running_loop())
        try:
            return await coroutine_factory()
        finally:
            engine.stop()
    return asyncio.run(main())


async def collect(engine: Engine, prompt: np.ndarray, seed: int, n: int) -> list[tuple[int, float, Finish]]:
    stream = engine.generate(prompt, SamplingParams(seed=seed), n)
    try:
        return [item async for item in stream]
    finally:
        stream.close()


def test_max_batch_splits_the_step_but_not_the_results(runtime):
    prompts = [np.array([1, 2, 3][: 1 + i % 3], dtype=np.int64) for i in range(5)]

    def many(engine):
        return run(engine, lambda: asyncio.gather(*(collect(engine, p, i, 40) for i, p in enumerate(prompts))))

    wide, narrow, parking = Engine(runtime, max_batch=256), Engine(runtime, max_batch=2), Engine(runtime, window=1)
    expected = many(wide)
    assert many(narrow) == expected
    assert many(parking) == expected  # streams parked and re-batched every character keep their state
    assert narrow.stats["step_calls"] >= 3 * 39 and wide.stats["step_calls"] < 3 * 39
    assert all(r[-1][2] is Finish.LENGTH for r in many(Engine(runtime)))


def test_cancelled_streams_leave_the_batch(runtime):
    # a window wider than the stream: it is never parked, so only close() can take it out of the engine
    engine = Engine(runtime, window=10_000_000)

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


class FlakyRuntime:
    """Delegates to a real runtime but fails the first `fail` step calls."""

    def __init__(self, runtime: Runtime, fail: int) -> None:
        self._runtime, self.fail = runtime, fail
        self.spec = runtime.spec

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def step(self, ids, state):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("simulated onnxruntime failure")
        return self._runtime.step(ids, state)


def test_an_onnxruntime_failure_fails_the_batch_and_the_engine_keeps_serving(runtime):
    engine = Engine(FlakyRuntime(runtime, fail=1))  # type: ignore[arg-type]

    async def scenario():
        with pytest.raises(EngineFailure):
            await collect(engine, np.array([1], dtype=np.int64), 1, 10)
        return await collect(engine, np.array([1], dtype=np.int64), 1, 10)

    assert len(run(engine, scenario)) == 10
