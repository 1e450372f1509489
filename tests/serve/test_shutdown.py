"""SIGTERM on a real `python -m serve` process: drain within --grace, then exit 0."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from support import ROOT

READY = re.compile(r" on (127\.0\.0\.1:\d+) ")
STREAMS = 8


def start(model, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(model), "--device", "cpu",
                             "--log-level", "WARNING", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    match = READY.search(line)
    if not match:
        proc.kill()
        pytest.fail(f"no ready line: {line!r} {proc.communicate()[1]}")
    return proc, match.group(1)


class Streams:
    """STREAMS Generate calls read on threads; each records (status, characters received, details)."""

    def __init__(self, stub: pb_grpc.CharRNNStub, chars: int) -> None:
        self.received = [0] * STREAMS
        self.results: list[tuple[grpc.StatusCode, int, str] | None] = [None] * STREAMS
        self.threads = [threading.Thread(target=self._read, args=(stub, chars, i)) for i in range(STREAMS)]
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 30
        while not all(self.received):
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.005)

    def _read(self, stub: pb_grpc.CharRNNStub, chars: int, i: int) -> None:
        try:
            for _ in stub.Generate(pb.GenerateRequest(prompt="it was", max_chars=chars, seed=i), timeout=60):
                self.received[i] += 1
            self.results[i] = (grpc.StatusCode.OK, self.received[i], "")
        except grpc.RpcError as error:
            self.results[i] = (error.code(), self.received[i], error.details())

    def join(self) -> list[tuple[grpc.StatusCode, int, str] | None]:
        for t in self.threads:
            t.join(timeout=60)
        return self.results


def test_sigterm_lets_8_streams_of_3000_characters_finish_then_exits_0(text_model):
    proc, target = start(text_model, "--max-chars", "3000", "--grace", "30")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.CharRNNStub(channel)
            streams = Streams(stub, 3000)
            proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 5
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Step(pb.StepRequest(text="it"), timeout=5)
            in_flight = sum(streams.received) < STREAMS * 3000
            results = streams.join()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        assert in_flight, "the streams had finished before the drain began: the test proves nothing"
        assert results == [(grpc.StatusCode.OK, 3000, "")] * STREAMS
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("grace, signals, why", [("0.5", 1, "grace period ended"), ("30", 2, "second SIGTERM")])
def test_end_of_grace_or_a_second_sigterm_cuts_streams_with_unavailable(text_model, grace, signals, why):
    proc, target = start(text_model, "--max-chars", "100000", "--max-batch", "1", "--grace", grace)
    try:
        with grpc.insecure_channel(target) as channel:
            streams = Streams(pb_grpc.CharRNNStub(channel), 100_000)
            started = time.monotonic()
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
            results = streams.join()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        for code, received, details in results:
            assert code == grpc.StatusCode.UNAVAILABLE and why in details and 0 < received < 100_000
    finally:
        if proc.poll() is None:
            proc.kill()
