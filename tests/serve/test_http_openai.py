"""The OpenAI-compatible completions API through a real server, judged by the official `openai` client
(unmodified) and by raw HTTP for what a client library hides (SSE framing, [DONE], headers, chunks).

Same model, same request, same seed: the same text as gRPC Generate; the stop sequence is left out of
the text, as OpenAI's API does.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import threading
import time
import urllib.parse
from collections.abc import Iterator

import openai
import pytest
from live import LiveServer, post, scrape, serve_model

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb

MODEL = "charrnn"


def client(server: LiveServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=60, **kw)


def grpc_generate(server: LiveServer, **fields) -> list[pb.GenerateResponse]:
    return list(server.stub.Generate(pb.GenerateRequest(**fields), timeout=60))


def text_of(responses) -> str:
    return "".join(r.text for r in responses)


def events(raw: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, checking its framing on the way."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    blocks = raw.decode().split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks[:3]
    return [b[len("data: "):] for b in blocks]


# ---- the official client against gRPC Generate -------------------------------------------------------

def test_openai_client_text_equals_grpc_generate(text_server):
    expected = grpc_generate(text_server, prompt="it was", max_chars=120, temperature=0.8, top_k=20, top_p=0.9,
                             seed=7)
    got = client(text_server).completions.create(model=MODEL, prompt="it was", max_tokens=120, temperature=0.8,
                                                 top_p=0.9, seed=7, extra_body={"top_k": 20})
    assert got.object == "text_completion" and got.model == MODEL and got.id.startswith("cmpl-")
    choice = got.choices[0]
    assert choice.text == text_of(expected) and choice.finish_reason == "length" and choice.index == 0
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (6, 120, 126)


def test_openai_client_streams_one_character_per_chunk_then_usage(text_server):
    expected = text_of(grpc_generate(text_server, prompt="it", max_chars=80, seed=11))
    chunks = list(client(text_server).completions.create(model=MODEL, prompt="it", max_tokens=80, seed=11,
                                                         stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected and all(len(t) == 1 for t in texts)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 79 + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 80
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_in_a_crowd_gets_each_seeds_text(text_server):
    seeds = list(range(12))
    expected = [text_of(grpc_generate(text_server, prompt="the ", max_chars=60, seed=s)) for s in seeds]

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=text_server.http_url + "/v1", api_key="x", max_retries=0) as c:
            async def one(seed: int) -> str:
                if seed % 2:
                    stream = await c.completions.create(model=MODEL, prompt="the ", max_tokens=60, seed=seed,
                                                        stream=True)
                    return "".join([chunk.choices[0].text async for chunk in stream])
                whole = await c.completions.create(model=MODEL, prompt="the ", max_tokens=60, seed=seed)
                return whole.choices[0].text
            return list(await asyncio.gather(*(one(s) for s in seeds)))
    assert asyncio.run(run()) == expected


def test_greedy_on_the_lesson_model(hihell_server):
    got = client(hihell_server).completions.create(model=MODEL, prompt="hihell", max_tokens=1, temperature=0)
    assert got.choices[0].text == "o"


# ---- logprobs and echo ----------------------------------------------------------------------------------

def test_logprobs_are_generates_with_the_top_alternatives(text_server):
    expected = grpc_generate(text_server, prompt="it was", max_chars=30, seed=5)
    got = client(text_server).completions.create(model=MODEL, prompt="it was", max_tokens=30, seed=5, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.tokens == [r.text for r in expected]
    assert lp.token_logprobs == pytest.approx([r.logprob for r in expected], abs=1e-6)
    assert lp.text_offset == list(range(30))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == logprob  # the 3 most likely, and always the chosen one
        best = sorted(top.values(), reverse=True)[:3]
        assert all(v <= 0 for v in best) and math.fsum(math.exp(v) for v in best) <= 1 + 1e-9
        assert max(top.values()) >= logprob


def test_echo_with_max_tokens_0_scores_the_prompt_like_predict(text_server):
    prompt = "it was the best of times"
    got = client(text_server).completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = got.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and got.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == list(prompt) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    predictions = list(text_server.stub.Predict(iter([pb.PredictRequest(text=prompt, top_k=200)]), timeout=30))
    for i in range(1, len(prompt)):
        p = dict((c.text, c.probability) for c in predictions[i - 1].top)[prompt[i]]
        assert lp.token_logprobs[i] == pytest.approx(math.log(p), abs=1e-5)
        assert next(iter(lp.top_logprobs[i])) == predictions[i - 1].next


def test_echo_prepends_the_prompt_to_the_completion(text_server):
    expected = text_of(grpc_generate(text_server, prompt="it", max_chars=10, seed=2))
    got = client(text_server).completions.create(model=MODEL, prompt="it", max_tokens=10, seed=2, echo=True,
                                                 logprobs=0)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == "it" + expected
    assert lp.text_offset == list(range(12)) and lp.token_logprobs[0] is None and lp.token_logprobs[2] < 0
    streamed = list(client(text_server).completions.create(model=MODEL, prompt="it", max_tokens=10, seed=2,
                                                           echo=True, stream=True))
    assert streamed[0].choices[0].text == "it" and "".join(c.choices[0].text for c in streamed) == "it" + expected


# ---- stop sequences ---------------------------------------------------------------------------------------

def _a_stop(server: LiveServer) -> tuple[str, str]:
    """A two-character stop that the seeded text reaches midway, and the text before its first occurrence."""
    full = text_of(grpc_generate(server, prompt="it", max_chars=300, seed=9))
    for at in range(40, 200):
        stop = full[at:at + 2]
        first = full.find(stop)
        if first >= 20:
            return stop, full[:first]
    raise AssertionError("no usable stop in the sample")


def test_stop_ends_the_text_before_the_stop_sequence(text_server):
    stop, before = _a_stop(text_server)
    grpc_text = text_of(grpc_generate(text_server, prompt="it", max_chars=300, seed=9, stop=[stop]))
    assert grpc_text == before + stop  # Generate keeps the stop; OpenAI's API leaves it out
    whole = client(text_server).completions.create(model=MODEL, prompt="it", max_tokens=300, seed=9, stop=stop)
    assert whole.choices[0].text == before and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(grpc_text)
    chunks = list(client(text_server).completions.create(model=MODEL, prompt="it", max_tokens=300, seed=9,
                                                         stop=[stop, "\x00never"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stops, texts, stopped, out", [
    (["ab"], "xab", True, "x"),
    (["ab"], "xaay", False, "xaay"),
    (["abc", "bd"], "abd", True, "a"),
    (["bc", "abc"], "zabc", True, "z"),
    (["\n\n"], "a\n\n", True, "a"),
])
def test_stop_hold_releases_only_what_cannot_begin_a_stop(stops, texts, stopped, out):
    from serve.api.http.openai_protocol import Char, StopHold
    hold, sent = StopHold(stops), []
    for i, c in enumerate(texts):
        if stopped and i == len(texts) - 1:
            sent += hold.feed(Char(c, None, None)) + hold.end(True)
            break
        sent += hold.feed(Char(c, None, None))
    else:
        sent += hold.end(False)
    assert "".join(c.text for c in sent) == out


# ---- raw HTTP: framing, headers, first character, disconnect -------------------------------------------

def test_sse_framing_headers_and_done(text_server):
    status, headers, raw = post(text_server, "/v1/completions",
                                {"model": MODEL, "prompt": "it", "max_tokens": 5, "seed": 1, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers.get("transfer-encoding") == "chunked" and headers["cache-control"] == "no-cache"
    data = events(raw)
    assert data[-1] == "[DONE]" and len(data) == 6
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    assert all("usage" not in c for c in chunks)


@pytest.fixture(scope="module")
def long_server(text_model) -> Iterator[LiveServer]:
    yield from serve_model(text_model, max_chars=200_000, max_batch=1, metrics_port=0, max_streams=2)


def test_the_first_character_arrives_long_before_a_long_completion_ends(long_server):
    url = urllib.parse.urlsplit(long_server.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": MODEL, "prompt": "it", "max_tokens": 20_000, "seed": 1, "stream": True}),
        headers={"content-type": "application/json"})
    response = conn.getresponse()
    first = response.readline()
    first_at = time.perf_counter() - started
    assert first.startswith(b"data: {")
    rest = response.read()
    total = time.perf_counter() - started
    conn.close()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert first_at < total / 10, (first_at, total)


def _active(server: LiveServer) -> float:
    return scrape(server)[("charrnn_active_streams", ())]


def test_a_client_that_disconnects_frees_its_slot_and_its_engine_work(long_server):
    before = scrape(long_server).get(("charrnn_cancelled_streams_total", ()), 0.0)
    url = urllib.parse.urlsplit(long_server.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": MODEL, "prompt": "it", "max_tokens": 200_000, "stream": True}),
        headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    assert _active(long_server) == 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 5
    while _active(long_server) != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.02)
    while scrape(long_server).get(("charrnn_cancelled_streams_total", ()), 0.0) != before + 1:
        assert time.monotonic() < deadline, "the engine kept computing the stream"  # it counts what it drops
        time.sleep(0.02)
    after = scrape(long_server)
    assert after[("charrnn_calls_total", (("code", "CANCELLED"), ("rpc", "completions"), ("surface", "http")))] >= 1


def test_http_and_grpc_share_the_call_limit(long_server):
    first = long_server.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=200_000), timeout=60)
    second = long_server.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=200_000), timeout=60)
    next(first), next(second)
    try:
        started = time.perf_counter()
        status, _, body = post(long_server, "/v1/completions", {"model": MODEL, "prompt": "it"})
        assert status == 429 and time.perf_counter() - started < 2.0
        error = json.loads(body)["error"]
        assert "limit of 2 concurrent calls" in error["message"] and error["type"] == "rate_limit_error"
        status, _, _ = post(long_server, "/v2/health/ready", b"", method="GET")
        assert status == 200  # probes take no slot
    finally:
        first.cancel()
        second.cancel()
    deadline = time.monotonic() + 5
    while _active(long_server) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, _, _ = post(long_server, "/v1/completions", {"model": MODEL, "prompt": "it", "max_tokens": 2})
    assert status == 200


def test_metrics_count_http_calls_and_first_characters(long_server):
    before = scrape(long_server)
    post(long_server, "/v1/completions", {"model": MODEL, "prompt": "it", "max_tokens": 3, "stream": True})
    post(long_server, "/v1/completions", {"model": MODEL, "prompt": "i\u00e9"})
    after = scrape(long_server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert delta("charrnn_calls_total", rpc="completions", code="OK", surface="http") == 1
    assert delta("charrnn_calls_total", rpc="completions", code="INVALID_ARGUMENT", surface="http") == 1
    assert delta("charrnn_time_to_first_char_seconds_count", surface="http") == 1


# ---- errors as OpenAI sends them ----------------------------------------------------------------------

BAD = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"prompt": "it"}, 400, "model", "model is required"),
    ({"model": MODEL}, 400, "prompt", "prompt is required"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "one string"),
    ({"model": MODEL, "prompt": [1, 2]}, 400, "prompt", "one string"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt", "must be a string"),
    ({"model": MODEL, "prompt": "it", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"model": MODEL, "prompt": "it", "max_tokens": 10**9}, 400, "max_tokens", "between 0 and 1000"),
    ({"model": MODEL, "prompt": "it", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": "it", "max_tokens": True}, 400, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": "it", "temperature": -1}, 400, "temperature", ">= 0"),
    ({"model": MODEL, "prompt": "it", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"model": MODEL, "prompt": "it", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"model": MODEL, "prompt": "it\u00e9"}, 400, None, "outside the model's vocabulary: '\u00e9'"),
    ({"model": MODEL, "prompt": "it", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "limit is 4"),
    ({"model": MODEL, "prompt": "it", "stop": 3}, 400, "stop", "string or a list"),
    ({"model": MODEL, "prompt": "it", "logprobs": 6}, 400, "logprobs", "between 0 and 5"),
    ({"model": MODEL, "prompt": "it", "n": 2}, 400, "n", "one choice"),
    ({"model": MODEL, "prompt": "it", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"model": MODEL, "prompt": "it", "logit_bias": {"1": 5}}, 400, "logit_bias", "not supported"),
    ({"model": MODEL, "prompt": "it", "best_of": 3}, 400, "best_of", "not supported"),
    ({"model": MODEL, "prompt": "it", "suffix": "x"}, 400, "suffix", "not supported"),
    ({"model": MODEL, "prompt": "it", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"model": MODEL, "prompt": "it", "bogus": 1}, 400, "bogus", "Unrecognized request argument"),
    ({"model": "gpt-4", "prompt": "it"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body, status, param, fragment", BAD)
def test_bad_requests_get_openai_errors_naming_the_parameter(text_server, body, status, param, fragment):
    got, headers, raw = post(text_server, "/v1/completions", body)
    error = json.loads(raw)["error"]
    assert got == status and headers["content-type"] == "application/json"
    assert fragment in error["message"] and error["param"] == param and error["type"]


def test_neutral_values_of_unsupported_parameters_are_accepted(text_server):
    got = client(text_server).completions.create(model=MODEL, prompt=["it"], max_tokens=3, frequency_penalty=0,
                                                 presence_penalty=0, best_of=1, logit_bias={}, user="me", n=1)
    assert len(got.choices[0].text) == 3


def test_the_openai_client_raises_its_own_exceptions(text_server):
    c = client(text_server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="it")
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model=MODEL, prompt="it", temperature=-2)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as chat:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in str(chat.value)
    assert [m.id for m in c.models.list()] == [MODEL]


def test_routes_and_methods_that_do_not_exist(text_server):
    assert post(text_server, "/v1/completions", b"", method="GET")[0] == 405
    status, _, raw = post(text_server, "/v1/nothing", {})
    assert status == 404 and "no route" in json.loads(raw)["error"]["message"]


@pytest.fixture(scope="module")
def small_body_server(hihell_model) -> Iterator[LiveServer]:
    yield from serve_model(hihell_model, max_message_bytes=2048, auth_token="s3cret")


def test_a_body_over_the_limit_gets_413(small_body_server):
    status, _, raw = post(small_body_server, "/v1/completions", {"model": MODEL, "prompt": "h" * 5000},
                          headers={"authorization": "Bearer s3cret"})
    assert status == 413 and "limit is 2048" in json.loads(raw)["error"]["message"]


def test_the_token_guards_the_api_but_not_the_probes(small_body_server):
    status, _, raw = post(small_body_server, "/v1/completions", {"model": MODEL, "prompt": "hi"})
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(small_body_server, api_key="wrong").completions.create(model=MODEL, prompt="hi")
    got = client(small_body_server, api_key="s3cret").completions.create(model=MODEL, prompt="hihell", max_tokens=1,
                                                                         temperature=0)
    assert got.choices[0].text == "o"
    assert post(small_body_server, "/v2/health/live", b"", method="GET")[0] == 200
    assert post(small_body_server, "/v2/models/charrnn/ready", b"", method="GET")[0] == 200
    assert post(small_body_server, "/v2/models/charrnn", b"", method="GET")[0] == 401


def test_grpc_and_http_in_one_crowd_give_the_same_texts(text_server):
    """64 streams at once, half over each transport, batched together: each seed's text as alone."""
    alone = {s: text_of(grpc_generate(text_server, prompt="it", max_chars=50, seed=s)) for s in range(0, 64, 7)}
    results: dict[tuple[str, int], str] = {}

    def over_grpc(seed: int) -> None:
        results[("grpc", seed)] = text_of(grpc_generate(text_server, prompt="it", max_chars=50, seed=seed))

    def over_http(seed: int) -> None:
        chunks = client(text_server).completions.create(model=MODEL, prompt="it", max_tokens=50, seed=seed,
                                                        stream=True)
        results[("http", seed)] = "".join(c.choices[0].text for c in chunks)
    threads = [threading.Thread(target=over_grpc if s % 2 else over_http, args=(s,)) for s in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 64
    for (_, seed), text in results.items():
        if seed in alone:
            assert text == alone[seed]

