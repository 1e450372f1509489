"""The prompt state cache (serve/engine/prompt_cache.py, fed by serve/engine/prefill.py): exact (a
Generate alone gives the same text and bit-equal logprobs with the cache on as off), resumed from the
longest cached prefix, a prefix shared by concurrent prompts computed once, bounded with LRU eviction,
counted in metrics that cross the engine process's pipe, and emptied when the model changes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_TEXT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import LiveServer, scrape, serve_model

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.engine.prompt_cache import CHUNK, ENTRY_OVERHEAD, PromptCache, chunk_ends, prompt_keys
from serve.engine.protocol import SamplingParams
from serve.engine.runtime import Runtime
from serve.engine.thread import ThreadEngine
from serve.ops.settings import Settings
from serve.process import records

ALPHABET = sorted(set(TINY_TEXT))


def generate(server: LiveServer, prompt: str, seed: int, max_chars: int = 12) -> tuple[str, list[float]]:
    responses = list(server.stub.Generate(pb.GenerateRequest(prompt=prompt, max_chars=max_chars, seed=seed),
                                          timeout=60))
    return "".join(r.text for r in responses), [r.logprob for r in responses]


def cache_metrics(server: LiveServer) -> dict[str, float]:
    samples = scrape(server)
    names = ("hits_total", "misses_total", "saved_characters_total", "evictions_total", "bytes")
    return {name: samples.get((f"charrnn_prompt_cache_{name}", ()), 0.0) for name in names}


def shared(p: str, q: str) -> int:
    """How many characters p and q start with alike."""
    n = 0
    while n < min(len(p), len(q)) and p[n] == q[n]:
        n += 1
    return n


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


@pytest.fixture(scope="module")
def cached_server(text_model) -> Iterator[LiveServer]:
    yield from serve_model(text_model, max_chars=1000, metrics_port=0, prompt_cache_mb=16)


@pytest.fixture(scope="module")
def uncached_server(text_model) -> Iterator[LiveServer]:
    yield from serve_model(text_model, max_chars=1000, metrics_port=0, prompt_cache_mb=0)


@pytest.fixture(scope="module")
def gathering_server(text_model) -> Iterator[LiveServer]:
    """Waits up to 1 s for concurrent arrivals, so that a crowd usually lands in one admission."""
    yield from serve_model(text_model, max_chars=1000, metrics_port=0, max_delay_us=1_000_000)


# ---- the pure pieces --------------------------------------------------------------------------------
def test_keys_name_the_model_and_every_character_before_each_chunk_end():
    ids = np.arange(200, dtype=np.int64) % 7
    ends, keys = prompt_keys(b"model-a", ids)
    assert ends == chunk_ends(200) == [64, 128, 192, 200]
    longer_ends, longer = prompt_keys(b"model-a", np.concatenate([ids, [1, 2, 3]]))
    assert longer[:3] == keys[:3] and longer[3] != keys[3]  # the mid-chunk end serves that prompt only
    assert longer_ends == [64, 128, 192, 203]
    changed = ids.copy()
    changed[100] += 1
    assert prompt_keys(b"model-a", changed)[1][:1] == keys[:1] and prompt_keys(b"model-a", changed)[1][1] != keys[1]
    assert not set(prompt_keys(b"model-b", ids)[1]) & set(keys)


def test_the_cache_finds_the_longest_prefix_and_evicts_the_least_recently_used():
    state, logits = np.zeros((2, 4), np.float32), np.zeros(5, np.float32)
    size = state.nbytes + logits.nbytes + ENTRY_OVERHEAD
    cache = PromptCache(3 * size, "sha")
    _, keys = cache.keys(np.arange(4 * CHUNK, dtype=np.int64))
    for i, key in enumerate(keys[:3]):
        cache.put(key, state + i, logits)
    assert cache.longest(keys) == (2, cache.longest(keys[:3])[1])
    assert cache.longest(keys)[1].state[0, 0] == 2 and not cache.longest(keys)[1].state.flags.writeable
    cache.longest(keys[:1])  # keys[0] becomes the most recent: keys[1] is the least
    cache.put(keys[3], state + 3, logits)
    assert (len(cache), cache.bytes, cache.evictions) == (3, 3 * size, 1)
    assert cache.longest(keys[:2])[0] == 0  # keys[1] went
    assert cache.longest(keys)[0] == 3


def test_chars_records_carry_the_cache_metrics():
    record = records.Chars([1], [2], [-0.5], [0], [0.001], [1], 1, 0, 3, 4, 5_000_000_000, 6, 123_456)
    assert records.Reader().feed(records.encode(record)) == [record]
    assert records.Chars([], [], [], [], [], [], 0, 0).cache_bytes == -1  # no news: the gauge is left alone


# ---- the engine, without gRPC -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(text_model) -> Runtime:
    return Runtime(text_model, "cpu")


def run_engine(engine: ThreadEngine, prompts: list[np.ndarray], together: bool) -> list[list[tuple]]:
    async def one(i: int, prompt: np.ndarray) -> list[tuple]:
        stream = engine.generate(prompt, SamplingParams(seed=i), 10)
        return [item async for item in stream]

    async def main() -> list[list[tuple]]:
        engine.start(asyncio.get_running_loop())
        try:
            if together:
                return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
            return [await one(i, p) for i, p in enumerate(prompts)]
        finally:
            engine.stop()
    return asyncio.run(main())


def test_concurrent_streams_with_one_new_long_prompt_compute_it_once(runtime, caplog):
    vocab = len(runtime.spec.vocab)
    prompt = (np.arange(1000, dtype=np.int64) * 7) % vocab
    other = np.concatenate([prompt[:500], (prompt[500:540] + 1) % vocab])  # parts from it at 500
    crowd = [prompt] * 8 + [other]
    off = ThreadEngine(runtime, max_delay_us=2_000_000)
    on = ThreadEngine(runtime, max_delay_us=2_000_000, prompt_cache_bytes=1 << 24)
    expected = run_engine(off, crowd, together=True)
    with caplog.at_level(logging.DEBUG, logger="serve.engine.prefill"):
        got = run_engine(on, crowd, together=True)
    assert [[t for t, _, _ in r] for r in got] == [[t for t, _, _ in r] for r in expected]
    for r, e in zip(got, expected, strict=True):  # in a crowd: the batching tests' tolerance
        np.testing.assert_allclose([p for _, p, _ in r], [p for _, p, _ in e], rtol=1e-5, atol=1e-6)
    assert off.stats["prefill_chars"] == 8 * 1000 + 540
    # the 1,000 once, and the other prompt from the last chunk end they share (448) on
    assert on.stats["prefill_chars"] == 1000 + 540 - 448
    assert on.metrics.registry.get_sample_value("charrnn_prompt_cache_saved_characters_total") == 7 * 1000 + 448
    assert "prompt cache: 9 prompts, 0 hits, 1092 of 8540 characters computed" in caplog.text


def test_a_small_cache_evicts_and_stays_within_its_capacity(runtime):
    vocab = len(runtime.spec.vocab)
    prompts = [(np.arange(640, dtype=np.int64) * (k + 2)) % vocab for k in range(6)]
    engine = ThreadEngine(runtime, prompt_cache_bytes=20_000)
    run_engine(engine, prompts + prompts[-1:] + prompts[:1], together=False)
    value = engine.metrics.registry.get_sample_value
    assert 0 < value("charrnn_prompt_cache_bytes") <= 20_000
    assert value("charrnn_prompt_cache_evictions_total") > 0
    # the last prompt again hits (it is the most recent); the first, long evicted, misses
    assert value("charrnn_prompt_cache_hits_total") == 1 and value("charrnn_prompt_cache_misses_total") == 7


# ---- real servers -----------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.text(alphabet=ALPHABET, min_size=0, max_size=300),
       cuts=st.lists(st.tuples(st.floats(0, 1), st.text(alphabet=ALPHABET, max_size=30)), min_size=2, max_size=5),
       seed=st.integers(0, 2**32))
def test_generate_alone_is_the_same_to_the_bit_with_the_cache_on_and_off(cached_server, uncached_server, base,
                                                                         cuts, seed):
    """Prompts sharing random prefixes of one text, each Generate alone, on a server with the cache and one
    without: same text, bit-equal logprobs; and every prompt that shares a chunk's end with an earlier one
    (or repeats it) resumed from the cache."""
    prompts = [base[:int(f * len(base))] + tail for f, tail in cuts]
    before = cache_metrics(cached_server)
    for i, prompt in enumerate(prompts):
        assert generate(cached_server, prompt, seed + i) == generate(uncached_server, prompt, seed + i), prompt
    resumable = sum(1 for i, p in enumerate(prompts)
                    if p and any(p == q or shared(p, q) >= CHUNK for q in prompts[:i]))
    assert delta(before, cache_metrics(cached_server))["hits_total"] >= resumable


def test_a_growing_prompt_pays_only_for_what_is_new(cached_server):
    text = (TINY_TEXT * 2)[:1500]
    before = cache_metrics(cached_server)
    for n in (1000, 1200, 1500, 1500):
        generate(cached_server, text[:n], 1, max_chars=1)
    got = delta(before, cache_metrics(cached_server))
    # 1000 new (unless an earlier test fed the same text), then resumed at 960 and 1152, then whole
    assert got["saved_characters_total"] >= 960 + 1152 + 1500
    assert got["hits_total"] >= 3 and got["misses_total"] <= 1
    assert cache_metrics(cached_server)["bytes"] > 0


def test_concurrent_generates_of_one_new_prompt_feed_it_once_in_the_engine_process(gathering_server):
    """The process engine (the default): 16 Generates of one new 900-character prompt arriving together
    feed it once, and the counts arrive from the engine process."""
    prompt = (TINY_TEXT * 2)[100:1000]

    async def crowd() -> list[str]:
        async with grpc.aio.insecure_channel(gathering_server.target) as channel:
            stub = pb_grpc.CharRNNStub(channel)

            async def one(seed: int) -> str:
                request = pb.GenerateRequest(prompt=prompt, max_chars=5, seed=seed)
                return "".join([m.text async for m in stub.Generate(request, timeout=60)])
            return list(await asyncio.gather(*(one(i) for i in range(16))))

    texts = asyncio.run(crowd())
    assert texts == [generate(gathering_server, prompt, i, max_chars=5)[0] for i in range(16)]
    got = cache_metrics(gathering_server)
    # the crowd: 15 fed nothing (in one admission or, arriving later, from the cache); then 16 whole hits
    assert got["saved_characters_total"] == 15 * 900 + 16 * 900
    assert got["hits_total"] + got["misses_total"] == 32 and got["misses_total"] >= 1
    assert got["bytes"] > 0 and got["evictions_total"] == 0


def test_the_cache_is_emptied_when_the_model_changes(text_model, hihell_model, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copyfile(text_model, path)
    live = LiveServer(Settings(model=str(path), device="cpu", reload_interval=0.2, metrics_port=0))
    try:
        prompt = TINY_TEXT[:300]
        generate(live, prompt, 1)
        generate(live, prompt, 1)
        assert cache_metrics(live)["hits_total"] == 1
        for source in (hihell_model, text_model):  # away and back: the same model, a new engine
            sha = hashlib.sha256(source.read_bytes()).hexdigest()
            shutil.copyfile(source, tmp_path / "next.onnx")
            os.replace(tmp_path / "next.onnx", path)
            deadline = time.monotonic() + 60
            while live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_sha256 != sha:
                assert time.monotonic() < deadline, "the reload within 60 s"
                time.sleep(0.05)
        before = cache_metrics(live)
        generate(live, prompt, 1)
        assert delta(before, cache_metrics(live))["misses_total"] == 1
        assert cache_metrics(live)["hits_total"] == 1
    finally:
        live.close()


def test_a_cache_of_0_mb_is_off(uncached_server):
    generate(uncached_server, TINY_TEXT[:200], 1)
    generate(uncached_server, TINY_TEXT[:200], 1)
    assert cache_metrics(uncached_server) == dict.fromkeys(cache_metrics(uncached_server), 0.0)


def test_the_docs_give_the_default_size():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "prompt-cache.md").read_text()
    assert f"--prompt-cache-mb {Settings.__dataclass_fields__['prompt_cache_mb'].default}" in docs


def test_the_startup_log_gives_the_cache_size(text_model, caplog):
    with caplog.at_level(logging.INFO, logger="serve.ops.server"):
        for _ in serve_model(text_model, prompt_cache_mb=2):
            pass
    assert "prompt cache: 2 MiB per worker process, about " in caplog.text
    assert f"one every {CHUNK} prompt characters" in caplog.text


def test_a_prefill_longer_than_the_hang_limit_is_not_taken_for_a_hang(text_model):
    """A prompt of 900,000 characters feeds for seconds; the engine process says it is alive between its
    calls, so the watchdog (here 1 s) leaves it be."""
    prompt = (TINY_TEXT * 400)[:900_000]
    for server in serve_model(text_model, max_prompt_chars=900_000, engine_hang_seconds=1.0, prompt_cache_mb=0):
        start = time.monotonic()
        text, _ = generate(server, prompt, 1, max_chars=1)
        assert len(text) == 1 and time.monotonic() - start > 2.0, "the prefill must outlast the hang limit"
        assert server.server.engine.stats["restarts"] == 0
