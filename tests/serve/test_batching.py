"""Batching must not change results: streams alone vs. batched with many others, batched vs unbatched."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

PROMPTS = ["it was", "the ", "", "it was the age of ", "w"]


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], max_chars=120 + i, seed=1000 + i,
                              temperature=[1.0, 0.7, 0.0, 1.3][i % 4], top_k=[0, 5, 0, 0][i % 4],
                              top_p=[1.0, 1.0, 0.9, 0.8][i % 4])


async def _generate_all(target: str, requests: list[pb.GenerateRequest]) -> list[tuple[str, list[float]]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)

        async def one(r: pb.GenerateRequest) -> tuple[str, list[float]]:
            responses = [m async for m in stub.Generate(r, timeout=60)]
            return "".join(m.text for m in responses), [m.logprob for m in responses]

        return await asyncio.gather(*(one(r) for r in requests))


def generate_all(target: str, requests: list[pb.GenerateRequest]) -> list[tuple[str, list[float]]]:
    return asyncio.run(_generate_all(target, requests))


def test_seeded_stream_alone_equals_batched_with_63_others(text_server, unbatched_server):
    requests = [request(i) for i in range(64)]
    alone = [generate_all(text_server.target, [r])[0] for r in requests[:4]]
    batched = generate_all(text_server.target, requests)
    for (text, logprobs), (text_b, logprobs_b) in zip(alone, batched):
        assert text_b == text
        np.testing.assert_allclose(logprobs_b, logprobs, rtol=1e-5, atol=1e-6)
    unbatched = generate_all(unbatched_server.target, requests)
    assert [t for t, _ in unbatched] == [t for t, _ in batched]
    assert [len(t) for t, _ in batched] == [r.max_chars for r in requests]


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
    texts = [f"it was the {w} of " for w in ("age", "season", "epoch", "spring", "winter")] * 8
    alone = [asyncio.run(_predict_and_step(text_server.target, [t]))[0] for t in texts[:5]]
    batched = asyncio.run(_predict_and_step(text_server.target, texts))
    for (probs, p), (probs_b, p_b) in zip(alone, batched):
        np.testing.assert_allclose(probs_b, probs, rtol=1e-5, atol=1e-6)
        assert p_b == pytest.approx(p, rel=1e-5, abs=1e-6)


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
