"""--engine process (the default) against --engine thread, the wire records between them, and what
happens when the engine process dies."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from live import LiveServer, serve_model

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.errors import EngineFailure
from serve.process import records
from serve.process.proxy import CHILD


@pytest.fixture(scope="module")
def thread_server(text_model: Path) -> Iterator[LiveServer]:
    yield from serve_model(text_model, max_chars=1000, engine="thread")


def generate(server: LiveServer, **fields: object) -> list[pb.GenerateResponse]:
    return list(server.stub.Generate(pb.GenerateRequest(**fields), timeout=30))


def test_both_engines_give_the_same_results(text_server, thread_server):
    """Same seeds, same text and log-probabilities; Predict and Step agree to float precision."""
    for seed, prompt in [(1, "it was"), (2, ""), (3, "the ")]:
        fields = dict(prompt=prompt, max_chars=200, seed=seed, temperature=0.9, top_k=20, top_p=0.95)
        a, b = generate(text_server, **fields), generate(thread_server, **fields)
        assert "".join(m.text for m in a) == "".join(m.text for m in b)
        assert [m.logprob for m in a] == [m.logprob for m in b]
        assert a[-1].finish_reason == b[-1].finish_reason == pb.FINISH_REASON_LENGTH
    request = [pb.PredictRequest(text="it was the season", top_k=3)]
    p = list(text_server.stub.Predict(iter(request), timeout=30))
    q = list(thread_server.stub.Predict(iter(request), timeout=30))
    assert [r.next for r in p] == [r.next for r in q]
    np.testing.assert_allclose([r.probability for r in p], [r.probability for r in q], rtol=1e-6)
    s = text_server.stub.Step(pb.StepRequest(text="it w"), timeout=30)
    t = thread_server.stub.Step(pb.StepRequest(text="it w"), timeout=30)
    assert (s.next, s.state) == (t.next, t.state)


def test_the_engine_process_reports_its_provider(text_server):
    assert text_server.server.provider == "CPUExecutionProvider"
    assert text_server.server.engine.proc.poll() is None


def test_a_dead_engine_process_fails_what_was_in_flight_and_is_replaced(text_model):
    """SIGKILL the engine process mid-stream: that stream ends UNAVAILABLE saying why, and the server
    serves again once the new engine process is up."""
    live = LiveServer(_settings(text_model))
    try:
        engine = live.server.engine
        # 5000 characters: the engine runs at most a window (1024) ahead of a reader that took one
        stream = live.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=5000, seed=1), timeout=60)
        next(stream)
        os.kill(engine.proc.pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model process exited unexpectedly" in caught.value.details()
        deadline = time.monotonic() + 60
        while engine.stats["restarts"] < 1:
            assert time.monotonic() < deadline, "the engine process was not replaced"
            time.sleep(0.05)
        assert len(generate(live, prompt="it", max_chars=50, seed=1)) == 50
        assert live.stub.Step(pb.StepRequest(text="it"), timeout=30).next
    finally:
        live.close()
    assert engine.proc.poll() is not None, "the engine process outlived its server"


def _settings(model: Path):
    from serve.ops.settings import Settings

    return dataclasses.replace(Settings(model=str(model), device="cpu"), max_chars=10_000)


def test_records_round_trip_and_survive_any_split():
    logits = np.arange(70_000, dtype=np.float32).reshape(700, 100)  # bigger than one pipe read may return
    sent = [
        records.Chars([3, 9], [1, 64], np.array([-0.5, -7.25]), [0, 1], [0.001], [2], 2, 0),
        records.Done(7, logits, np.ones((2, 4), dtype=np.float32)),
        records.Chars([], [], np.empty(0), [], [], [], 0, 4),
        records.Failed([1], [2], records.Failure.of(EngineFailure("model execution failed"))),
        records.Stop("the server is shutting down"),
    ]
    data = b"".join(map(records.encode, sent))
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = sorted(rng.integers(0, len(data), 5).tolist())
        reader = records.Reader()
        got = []
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            got += reader.feed(data[a:b])
        assert [type(r) for r in got] == [type(r) for r in sent]
        assert got[0] == records.Chars([3, 9], [1, 64], [-0.5, -7.25], [0, 1], [0.001], [2], 2, 0)
        assert got[1].job == 7 and np.array_equal(got[1].logits, logits) and got[1].state.shape == (2, 4)
        assert got[2] == records.Chars([], [], [], [], [], [], 0, 4)
        assert got[3][:2] == ([1], [2]) and isinstance(got[3].error.exception(), EngineFailure)
        assert got[4] == sent[4]


def test_the_engine_process_waits_for_a_slow_reader_and_resumes(text_model):
    """Progress crosses the pipe: once gRPC's flow control stops the handler, the stream stops a window
    (1024) further on, and it goes on when the client reads again. A client that stops reading costs
    no more than that."""
    live = LiveServer(dataclasses.replace(_settings(text_model), max_chars=100_000))
    try:
        engine = live.server.engine
        # A small, fixed HTTP/2 window (no BDP growth), so that gRPC stops the handler soon after the
        # client stops reading.
        channel = grpc.insecure_channel(live.target, options=[("grpc.http2.bdp_probe", 0),
                                                               ("grpc.http2.lookahead_bytes", 16384)])
        stub = pb_grpc.CharRNNStub(channel)
        stream = stub.Generate(pb.GenerateRequest(prompt="it", max_chars=100_000, seed=4), timeout=120)
        next(stream)
        time.sleep(1.5)
        stalled = engine.stats["step_rows"]
        time.sleep(0.5)
        assert engine.stats["step_rows"] == stalled < 100_000, "the engine kept stepping a stream nobody reads"
        for _ in range(5000):
            next(stream)
        deadline = time.monotonic() + 30
        while engine.stats["step_rows"] == stalled:
            assert time.monotonic() < deadline, "the stream never resumed"
            time.sleep(0.05)
        stream.cancel()
        channel.close()
    finally:
        live.close()


def test_full_pipes_both_ways_do_not_stall_the_server(text_model):
    """Requests and results both bigger than a pipe holds, many at once: the server must keep reading
    while the engine process writes (a blocking write on the loop once deadlocked the two)."""
    import asyncio

    live = LiveServer(_settings(text_model))
    try:
        vocab = list(live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).vocab)
        text = "".join(vocab[i % len(vocab)] for i in range(4000))  # 32 KB of ids out, 1 MB of logits back

        async def run() -> list[int]:
            async with grpc.aio.insecure_channel(live.target) as channel:
                stub = pb_grpc.CharRNNStub(channel)

                async def one() -> int:
                    return len([r async for r in stub.Predict(iter([pb.PredictRequest(text=text)]), timeout=60)])

                calls = [asyncio.ensure_future(one()) for _ in range(16)]
                info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=20)  # the loop still answers
                assert info.vocab
                return await asyncio.gather(*calls)

        assert asyncio.run(run()) == [4000] * 16
    finally:
        live.close()


def _engine_children() -> list[int]:
    """This process's engine processes still running, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and CHILD[-1].encode() in cmdline and stat[0] != "Z":
            found.append(int(entry))
    return found


def test_a_server_that_cannot_bind_stops_its_engine_process(text_model):
    import asyncio
    import socket

    from serve.ops.server import create_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before = set(_engine_children())

        async def start() -> None:  # grpc.aio wants a loop, as in `python -m serve`
            create_server(dataclasses.replace(_settings(text_model), port=taken.getsockname()[1]))

        with pytest.raises(OSError, match="cannot bind"):
            asyncio.run(start())
    assert set(_engine_children()) <= before  # none left behind (an earlier test's may be ending)


def test_the_engine_restarts_with_more_than_1024_descriptors_open(text_model):
    """A busy server holds more descriptors than select() can watch; the restart must not use it."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    live = LiveServer(_settings(text_model))
    try:
        engine = live.server.engine
        os.kill(engine.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while engine.stats["restarts"] < 1:
            assert time.monotonic() < deadline, "the engine process was not replaced"
            time.sleep(0.05)
        assert len(generate(live, prompt="it", max_chars=20, seed=1)) == 20
    finally:
        live.close()
        for fd in held:
            os.close(fd)


def test_a_small_window_still_resumes_a_reader_that_caught_up(text_model):
    """The engine learns of the reader's progress when the reader waits, whatever the window."""
    import asyncio

    from serve.engine.protocol import SamplingParams
    from serve.process.proxy import ProcessEngine

    async def run() -> int:
        engine = ProcessEngine(str(text_model), "cpu", window=40)
        engine.start(asyncio.get_running_loop())
        try:
            stream = engine.generate(np.array([1, 2]), SamplingParams(seed=5), 300)
            got = 0
            async for _ in stream:
                got += 1
                if got % 50 == 0:
                    await asyncio.sleep(0.05)  # let the engine get a window ahead and park
            return got
        finally:
            engine.stop()

    assert asyncio.run(asyncio.wait_for(run(), timeout=60)) == 300


def test_a_predict_whose_caller_left_is_dropped_before_its_call(text_model):
    """The engine process is stopped while a Step waits in its pipe; the Step's deadline passes; once the
    engine runs again it drops that Step instead of computing it (no answer comes back for it)."""
    live = LiveServer(dataclasses.replace(_settings(text_model), engine_hang_seconds=0))
    try:
        engine = live.server.engine
        live.stub.Step(pb.StepRequest(text="it was"), timeout=30)  # warm: the next answer is prompt
        os.kill(engine.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                live.stub.Step(pb.StepRequest(text="it was"), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.3)  # the server has ended the call and told the engine process
        finally:
            os.kill(engine.proc.pid, signal.SIGCONT)
        assert live.stub.Step(pb.StepRequest(text="it was"), timeout=30).next  # read after the one dropped
        assert engine.stats["unclaimed_results"] == 0, "the engine computed a Step whose caller had gone"
    finally:
        live.close()


def test_step_brings_back_only_the_last_row_of_logits(text_model):
    """Step uses the last character's prediction only: the engine process sends that row, not T of them."""
    import asyncio

    from serve.process.proxy import ProcessEngine

    async def run() -> tuple:
        engine = ProcessEngine(str(text_model), "cpu")
        engine.start(asyncio.get_running_loop())
        try:
            ids = np.arange(300, dtype=np.int64) % len(engine.vocab)
            return await engine.predict(ids, None), await engine.predict(ids, None, last_only=True)
        finally:
            engine.stop()

    (logits, state), (last, last_state) = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert logits.shape[0] == 300 and last.shape == (1, logits.shape[1])
    np.testing.assert_array_equal(last[0], logits[-1])
    np.testing.assert_array_equal(last_state, state)
