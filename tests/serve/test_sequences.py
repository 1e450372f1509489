"""serve/service/sequences.py alone: the server-held state of KServe sequences, on a fake clock."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.errors import EngineFailure, InvalidArgument, ModelChanged, ResourceExhausted
from serve.service.sequences import SequenceControl, SequenceModel, Sequences


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock, cap: int = 3) -> Sequences:
    return Sequences(np.zeros(2, dtype=np.float32), max_sequences=cap, idle_seconds=10.0, clock=clock)


def add(value: float):
    """work(state) -> (the state it saw, state + value)."""
    async def work(state: np.ndarray):
        await asyncio.sleep(0)
        return state.copy(), state + value
    return work


def run(coro):
    return asyncio.run(coro)


def test_state_is_carried_and_freed_at_end():
    async def main():
        s = table(Clock())
        assert (await s.run(SequenceControl(1, start=True), add(1), "m") == 0).all()
        assert (await s.run(SequenceControl(1), add(1), "m") == 1).all()
        assert (await s.run(SequenceControl(1, end=True), add(1), "m") == 2).all()
        assert len(s) == 0
        with pytest.raises(InvalidArgument, match="sequence 1 to model 'm' must specify sequence_start"):
            await s.run(SequenceControl(1), add(1), "m")
    run(main())


def test_a_sequence_started_on_another_model_is_refused_until_started_again():
    """After a reload (serve/ops/reload.py) a live sequence holds the old model's state: it cannot go on."""
    old, new = SequenceModel("a" * 64, np.zeros(2, dtype=np.float32)), SequenceModel("b" * 64, np.ones(3, np.float32))

    async def main():
        s = Sequences(None, max_sequences=3, idle_seconds=10.0, clock=Clock())
        await s.run(SequenceControl(1, start=True), add(1), "m", old)
        assert (await s.run(SequenceControl(1), add(1), "m", old) == 1).all()
        for _ in range(2):  # it keeps saying so, with the same clear message
            with pytest.raises(ModelChanged, match=r"started on the model file with sha256 aaaaaaaaaaaa\.\.\..*"
                                                   r"sequence_start"):
                await s.run(SequenceControl(1), add(1), "m", new)
        seen = await s.run(SequenceControl(1, start=True), add(1), "m", new)
        assert seen.shape == (3,) and (seen == 1).all(), "started again at the new model's zero state"
        assert (await s.run(SequenceControl(1, end=True), add(1), "m", new) == 2).all()
    run(main())


def test_ids_of_different_types_are_different_sequences():
    async def main():
        s = table(Clock())
        await s.run(SequenceControl(7, start=True), add(5), "m")
        with pytest.raises(InvalidArgument):
            await s.run(SequenceControl("7"), add(1), "m")
    run(main())


def test_idle_sequences_expire_and_free_their_place():
    async def main():
        clock = Clock()
        s = table(clock, cap=1)
        await s.run(SequenceControl(1, start=True), add(1), "m")
        with pytest.raises(ResourceExhausted, match="--max-sequences"):
            await s.run(SequenceControl(2, start=True), add(1), "m")
        clock.now = 10.5
        with pytest.raises(InvalidArgument, match="idle"):
            await s.run(SequenceControl(1), add(1), "m")
        await s.run(SequenceControl(2, start=True), add(1), "m")
    run(main())


def test_concurrent_requests_of_one_sequence_run_in_arrival_order():
    async def main():
        s = table(Clock())
        await s.run(SequenceControl(1, start=True), add(0), "m")
        seen = await asyncio.gather(*(s.run(SequenceControl(1), add(1), "m") for _ in range(5)))
        assert [float(x[0]) for x in seen] == [0, 1, 2, 3, 4]
    run(main())


def test_a_second_start_waits_for_the_queued_requests_then_restarts():
    async def main():
        s = table(Clock())
        await s.run(SequenceControl(1, start=True), add(1), "m")
        queued = asyncio.ensure_future(s.run(SequenceControl(1), add(1), "m"))
        restarted = await s.run(SequenceControl(1, start=True), add(1), "m")
        assert float((await queued)[0]) == 1 and float(restarted[0]) == 0
    run(main())


def test_a_failed_start_leaves_no_sequence():
    async def fail(state):
        raise EngineFailure("model execution failed")

    async def main():
        s = table(Clock())
        with pytest.raises(EngineFailure):
            await s.run(SequenceControl(1, start=True), fail, "m")
        assert len(s) == 0
    run(main())
