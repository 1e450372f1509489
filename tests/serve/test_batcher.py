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
    engine = Engine(runtime, window=8)

    async def scenario():
        stream = engine.generate(np.array([1], dtype=np.int64), SamplingParams(seed=1), 100_000)
        await stream.__anext__()
        stream.close()
        return await collect(engine, np.array([2], dtype=np.int64), 2, 30)

    assert len(run(engine, scenario)) == 30
    # the abandoned stream was parked by its window, then dropped: far fewer than 100000 steps ran
    assert engine.stats["step_rows"] < 1000


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
