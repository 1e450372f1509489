"""Limits, cancellation, deadlines and metrics on a real server with --max-streams 1.

A refusal over capacity is immediate, and a cancelled (or expired) stream's slot is freed and its
computation stopped: what a queue or a leak would break. The bounds are seconds, generous for a busy
2-core machine (docs/reliability.md's figures, a few milliseconds each, are measured, not asserted here): a
call that queued behind the 100000-character stream, or a slot never freed, still fails them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live import LiveServer, scrape, serve_model

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb

LIMITS = dict(max_streams=1, max_chars=100_000, max_prompt_chars=50, max_message_bytes=4096, metrics_port=0)
PROMPTLY = 2.0  # seconds: "at once" on a loaded machine; the stream it competes with runs for minutes


@pytest.fixture(scope="module")
def limited(text_model) -> Iterator[LiveServer]:
    yield from serve_model(text_model, **LIMITS)


def metric(server: LiveServer, name: str, **labels: str) -> float:
    return scrape(server).get((name, tuple(sorted(labels.items()))), 0.0)


def step_call(server: LiveServer, text: str = "it", **kw) -> pb.StepResponse:
    return server.stub.Step(pb.StepRequest(text=text, **kw), timeout=10)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def wait_for_slot(server: LiveServer, limit: float = PROMPTLY) -> float:
    """Seconds until a Step call is admitted again (retrying every millisecond)."""
    start = time.perf_counter()
    while True:
        try:
            step_call(server)
            return time.perf_counter() - start
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert time.perf_counter() - start < limit, "the slot was never freed"
            time.sleep(0.001)


def long_stream(server: LiveServer, timeout: float | None = 30):
    call = server.stub.Generate(pb.GenerateRequest(prompt="it was", max_chars=100_000, seed=1), timeout=timeout)
    for _ in range(5):
        next(call)
    return call


def test_over_capacity_is_refused_at_once_and_health_is_not_counted(limited):
    call = long_stream(limited)
    try:
        refusals = []
        for rpc in (lambda: step_call(limited),
                    lambda: limited.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10),
                    lambda: list(limited.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=3), timeout=10))):
            start = time.perf_counter()
            code, details = code_of(rpc)
            refusals.append(time.perf_counter() - start)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 1 concurrent calls" in details
        assert max(refusals) < PROMPTLY, refusals  # typically 1-3 ms: nothing waits in a queue
        health = health_pb2_grpc.HealthStub(limited.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert metric(limited, "charrnn_active_streams") == 1
        assert metric(limited, "charrnn_calls_total", rpc="Step", code="RESOURCE_EXHAUSTED", surface="grpc") >= 1
    finally:
        call.cancel()
    wait_for_slot(limited)


def test_a_cancelled_stream_frees_its_slot_and_stops_computing(limited):
    before = metric(limited, "charrnn_cancelled_streams_total")
    call = long_stream(limited)
    call.cancel()
    freed = wait_for_slot(limited)
    assert freed < PROMPTLY, f"slot freed after {freed * 1e3:.1f} ms"
    deadline = time.monotonic() + PROMPTLY  # the engine drops it at its next step
    while metric(limited, "charrnn_cancelled_streams_total") < before + 1:
        assert time.monotonic() < deadline, "the engine did not drop the cancelled stream"
        time.sleep(0.005)
    rows = limited.server.engine.stats["step_rows"]
    time.sleep(0.1)
    assert limited.server.engine.stats["step_rows"] == rows, "the engine still steps the cancelled stream"


def test_an_expired_deadline_frees_the_slot_and_stops_computing(limited):
    before = metric(limited, "charrnn_cancelled_streams_total")
    expired = metric(limited, "charrnn_calls_total", rpc="Generate", code="DEADLINE_EXCEEDED", surface="grpc")
    cancelled = metric(limited, "charrnn_calls_total", rpc="Generate", code="CANCELLED", surface="grpc")
    call = limited.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=100_000), timeout=0.3)
    next(call)
    time.sleep(0.35)  # the client reads nothing more; the deadline passes on the server
    assert wait_for_slot(limited) < PROMPTLY
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert metric(limited, "charrnn_cancelled_streams_total") == before + 1
    expired_now = metric(limited, "charrnn_calls_total", rpc="Generate", code="DEADLINE_EXCEEDED", surface="grpc")
    assert expired_now == expired + 1
    assert metric(limited, "charrnn_calls_total", rpc="Generate", code="CANCELLED", surface="grpc") == cancelled
    rows = limited.server.engine.stats["step_rows"]
    time.sleep(0.1)
    assert limited.server.engine.stats["step_rows"] == rows


def test_a_deadline_that_passes_while_the_server_waits_for_the_client_is_counted_as_such(limited):
    """Predict waits for the client's next message; the deadline ends it there, not a cancel."""
    expired = metric(limited, "charrnn_calls_total", rpc="Predict", code="DEADLINE_EXCEEDED", surface="grpc")
    cancelled = metric(limited, "charrnn_calls_total", rpc="Predict", code="CANCELLED", surface="grpc")
    held = threading.Event()

    def requests():
        yield pb.PredictRequest(text="it")
        held.wait(5)  # the server is left waiting for more

    call = limited.stub.Predict(requests(), timeout=0.2)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    held.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for_slot(limited)  # the call has ended on the server: its hooks ran
    deadlines = metric(limited, "charrnn_calls_total", rpc="Predict", code="DEADLINE_EXCEEDED", surface="grpc")
    assert deadlines == expired + 1, scrape(limited)
    assert metric(limited, "charrnn_calls_total", rpc="Predict", code="CANCELLED", surface="grpc") == cancelled


@pytest.mark.parametrize("call, code, fragment", [
    (lambda s: list(s.stub.Generate(pb.GenerateRequest(prompt="it " * 17, max_chars=3), timeout=10)),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt is 51 characters, the limit is 50 (--max-prompt-chars)"),
    (lambda s: list(s.stub.Predict(iter([pb.PredictRequest(text="i" * 51)]), timeout=10)),
     grpc.StatusCode.INVALID_ARGUMENT, "text is 51 characters, the limit is 50"),
    (lambda s: step_call(s, "t" * 51), grpc.StatusCode.INVALID_ARGUMENT, "the limit is 50"),
    (lambda s: list(s.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=100_001), timeout=10)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_chars must be in 1..100000"),
    (lambda s: list(s.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=3, stop=["t"] * 17), timeout=10)),
     grpc.StatusCode.INVALID_ARGUMENT, "stop has 17 strings, the limit is 16"),
    # gRPC itself refuses a message over grpc.max_receive_message_length, before any handler runs
    (lambda s: step_call(s, "it", state=b"\0" * 5000), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "larger than max (5007 vs. 4096)"),
])
def test_limits_say_what_the_limit_is(limited, call, code, fragment):
    got, details = code_of(lambda: call(limited))
    assert got == code and fragment in details, details


def test_metrics_count_calls_characters_batches_and_first_characters(limited):
    before = scrape(limited)
    responses = list(limited.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=40, seed=2), timeout=10))
    step_call(limited)
    after = scrape(limited)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert len(responses) == 40
    assert delta("charrnn_characters_generated_total") == 40
    assert delta("charrnn_calls_total", rpc="Generate", code="OK", surface="grpc") == 1
    assert delta("charrnn_calls_total", rpc="Step", code="OK", surface="grpc") == 1
    assert delta("charrnn_batch_size_count") == 39 and delta("charrnn_batch_size_sum") == 39  # first: prefill
    assert delta("charrnn_step_seconds_count") == 39 and delta("charrnn_step_seconds_sum") > 0
    assert delta("charrnn_time_to_first_char_seconds_count", surface="grpc") == 1
    assert after[("charrnn_active_streams", ())] == 0
    names = {name for name, _ in after}
    assert all(name.startswith("charrnn_") for name in names)
