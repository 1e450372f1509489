"""Batching must not change results: streams alone vs. batched with many others, batched vs unbatched;
and batching must happen: the server's charrnn_batch_size histogram (rows per onnxruntime step call)
shows one row per call for streams alone and many for streams together."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from live import LiveServer, scrape, serve_model

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

PROMPTS = ["it was", "the ", "", "it was the age of ", "w"]


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], max_chars=120 + i, seed=1000 + i,
                              temperature=[1.0, 0.7, 0.0, 1.3][i % 4], top_k=[0, 5, 0, 0][i % 4],
                              top_p=[1.0, 1.0, 0.9, 0.8][i % 4])


async def _generate_all(target: str, requests: list[pb.GenerateRequest],
                        together: bool = True) -> list[tuple[str, list[float]]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)

        async def one(r: pb.GenerateRequest) -> tuple[str, list[float]]:
            responses = [m async for m in stub.Generate(r, timeout=60)]
            return "".join(m.text for m in responses), [m.logprob for m in responses]

        if together:
            return await asyncio.gather(*(one(r) for r in requests))
        return [await one(r) for r in requests]  # each stream alone in the engine, one after another


def generate_all(target: str, requests: list[pb.GenerateRequest], together: bool = True) -> list[tuple[str, list[float]]]:
    return asyncio.run(_generate_all(target, requests, together))


@pytest.fixture(scope="module")
def counted_server(text_model) -> Iterator[LiveServer]:
    """Its own server, with metrics: nothing else steps in it while a test counts its step calls."""
    yield from serve_model(text_model, max_chars=1000, metrics_port=0)


@pytest.fixture(scope="module")
def gathering_server(text_model) -> Iterator[LiveServer]:
    """An idle engine waits up to --max-delay-us for concurrent arrivals, or until --max-batch are in:
    2 s and 64 let all 64 streams of a test share their first call however busy the machine is (when
    fewer arrive in time, they still batch, only in more groups)."""
    yield from serve_model(text_model, max_chars=1000, metrics_port=0, max_batch=64, max_delay_us=2_000_000)


class StepCalls:
    """What charrnn_batch_size counted between two scrapes: onnxruntime step calls and their rows."""

    def __init__(self, before: dict, after: dict) -> None:
        def delta(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        self.calls = delta("charrnn_batch_size_count")
        self.rows = delta("charrnn_batch_size_sum")
        self.over_32 = self.calls - delta("charrnn_batch_size_bucket", le="32.0")  # calls of more than 32 rows


def counted(server: LiveServer, requests: list[pb.GenerateRequest],
            together: bool) -> tuple[list[tuple[str, list[float]]], StepCalls]:
    before = scrape(server)
    results = generate_all(server.target, requests, together)
    return results, StepCalls(before, scrape(server))


def test_seeded_streams_alone_equal_batched_with_63_others(counted_server, gathering_server, unbatched_server):
    requests = [request(i) for i in range(64)]
    rows = sum(r.max_chars - 1 for r in requests)  # a step per character after the first (the prefill's)
    longest = max(r.max_chars for r in requests) - 1
    alone, alone_calls = counted(counted_server, requests, together=False)
    batched, batched_calls = counted(gathering_server, requests, together=True)
    assert (alone_calls.calls, alone_calls.rows) == (rows, rows), "streams alone: one row per step call"
    assert batched_calls.rows == rows  # the same work, in one call per step of the longest stream ...
    assert batched_calls.calls <= 2 * longest, f"{batched_calls.calls:.0f} step calls for {rows} rows: no batching"
    assert batched_calls.over_32 > 0  # ... most of them holding most of the 64 streams
    assert [len(t) for t, _ in batched] == [r.max_chars for r in requests]
    for i, ((text, logprobs), (text_b, logprobs_b)) in enumerate(zip(alone, batched)):
        assert text_b == text, f"stream {i}"
        np.testing.assert_allclose(logprobs_b, logprobs, rtol=1e-5, atol=1e-6, err_msg=f"stream {i}")
    unbatched = generate_all(unbatched_server.target, requests)
    assert [t for t, _ in unbatched] == [t for t, _ in batched]


async def _predict_and_step(target: str, texts: list[str]) -> list[tuple[list[float], float]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)

        async def one(text: str) -> tuple[list[float], float]:
            call = stub.Predict(iter([pb.PredictRequest(text=c) for c in text]), timeout=60)
            probs = [m.probability async for m in call]
            state, p = b"", 0.0
            for chunk in (text[:3], text[3:]):
                r = await stub.Step(pb.StepRequest(state=state, text=chunk), timeout=60)
                state, p = r.state, r.probability
            return probs, p

        return await asyncio.gather(*(one(t) for t in texts))


def test_predict_and_step_alone_equal_batched(text_server):
    words = ("age", "season", "epoch", "spring", "winter")
    texts = [f"it was the {w} of " for w in words] * 8
    alone = {t: asyncio.run(_predict_and_step(text_server.target, [t]))[0] for t in texts[:len(words)]}
    batched = asyncio.run(_predict_and_step(text_server.target, texts))
    for i, (text, (probs_b, p_b)) in enumerate(zip(texts, batched)):  # all 40, each against its text alone
        probs, p = alone[text]
        np.testing.assert_allclose(probs_b, probs, rtol=1e-5, atol=1e-6, err_msg=f"call {i}")
        assert p_b == pytest.approx(p, rel=1e-5, abs=1e-6), f"call {i}"


def test_a_cancelled_stream_does_not_disturb_others(text_server):
    async def main() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(text_server.target) as channel:
            stub = pb_grpc.CharRNNStub(channel)
            doomed = stub.Generate(pb.GenerateRequest(prompt="it", max_chars=1000, seed=1), timeout=60)
            await doomed.read()
            keeper = stub.Generate(request(1), timeout=60)
            doomed.cancel()
            return "".join([m.text async for m in keeper]), ""

    kept, _ = asyncio.run(main())
    assert kept == generate_all(text_server.target, [request(1)])[0][0]
