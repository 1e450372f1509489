"""Health tells the truth about the engine process: readiness ("" and charrnn.v1.CharRNN) turns
NOT_SERVING while a dead or hung engine is replaced and SERVING once it is back, `liveness` stays SERVING
while the server can recover, and a server whose engine cannot be replaced exits non-zero."""

from __future__ import annotations

import dataclasses
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live import LiveServer

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.inference import grpc_service_pb2 as inference_pb
from serve.api.pb.inference import grpc_service_pb2_grpc as inference_grpc
from serve.ops.settings import Settings, parse
from support import ROOT

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = ("", "charrnn.v1.CharRNN", "inference.GRPCInferenceService")
NAMES = (*READINESS, "liveness")


def settings(model: Path, **overrides: object) -> Settings:
    return dataclasses.replace(Settings(model=str(model), device="cpu"), max_chars=100_000, **overrides)


def check(channel: grpc.Channel, name: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


class Watch:
    """Health/Watch on one name, read on a thread: every status it reports, in order."""

    def __init__(self, channel: grpc.Channel, name: str) -> None:
        self.statuses: list[int] = []
        self._call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_for(lambda: self.statuses, "Watch sent nothing")

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.statuses.append(reply.status)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=10)


def kserve_ready(channel: grpc.Channel) -> tuple[bool, bool]:
    """KServe's own probes (ServerReady, ModelReady), which must agree with gRPC health."""
    stub = inference_grpc.GRPCInferenceServiceStub(channel)
    server = stub.ServerReady(inference_pb.ServerReadyRequest(), timeout=5).ready
    model = stub.ModelReady(inference_pb.ModelReadyRequest(name="charrnn"), timeout=5).ready
    return server, model


def wait_for(condition, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def long_stream(live: LiveServer):
    stream = live.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=100_000, seed=1), timeout=120)
    next(stream)
    return stream


def drain(stream) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    return caught.value


def test_the_hang_limit_defaults_to_5_seconds():
    assert parse(["--model", "m.onnx"]).engine_hang_seconds == 5.0


def test_health_turns_not_serving_while_a_killed_engine_is_replaced(text_model):
    live = LiveServer(settings(text_model))
    watches = {name: Watch(live.channel, name) for name in NAMES}
    try:
        engine = live.server.engine
        assert [check(live.channel, name) for name in NAMES] == [SERVING] * len(NAMES)
        assert kserve_ready(live.channel) == (True, True)
        streams = [long_stream(live) for _ in range(8)]
        os.kill(engine.proc.pid, signal.SIGKILL)
        for stream in streams:
            error = drain(stream)
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "exited unexpectedly" in error.details()
        wait_for(lambda: engine.stats["restarts"] == 1, "the engine process was not replaced")
        wait_for(lambda: all(w.statuses[-1] == SERVING for w in watches.values()), "health did not come back")
        for name in READINESS:
            assert watches[name].statuses == [SERVING, NOT_SERVING, SERVING], name
        assert kserve_ready(live.channel) == (True, True)
        assert watches["liveness"].statuses == [SERVING]  # it could recover all along
        assert len(list(live.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=30), timeout=30))) == 30
    finally:
        for w in watches.values():
            w.close()
        live.close()


def test_a_hung_engine_is_killed_and_replaced_but_an_idle_one_is_left_alone(text_model):
    live = LiveServer(settings(text_model, engine_hang_seconds=1.0))
    watch = Watch(live.channel, "")
    engine = live.server.engine
    try:
        os.kill(engine.proc.pid, signal.SIGSTOP)  # stopped with no work waiting on it: not hung
        time.sleep(2.5)
        os.kill(engine.proc.pid, signal.SIGCONT)
        assert engine.stats["restarts"] == 0 and watch.statuses == [SERVING]

        streams = [long_stream(live) for _ in range(8)]
        os.kill(engine.proc.pid, signal.SIGSTOP)  # alive, making no progress, readers waiting
        started = time.monotonic()
        for stream in streams:
            error = drain(stream)
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "stopped making progress" in error.details()
        assert time.monotonic() - started < 30
        wait_for(lambda: engine.stats["restarts"] == 1, "the hung engine process was not replaced")
        wait_for(lambda: watch.statuses[-1] == SERVING, "health did not come back")
        assert watch.statuses == [SERVING, NOT_SERVING, SERVING]
        assert live.stub.Step(pb.StepRequest(text="it"), timeout=30).next
    finally:
        watch.close()
        live.close()


def test_a_restart_loads_the_bytes_that_were_served(text_model, tmp_path):
    """Only an explicit reload may change the model: the file gone (or rewritten) since start changes
    nothing when the engine process is replaced."""
    model = tmp_path / "model.onnx"
    shutil.copy(text_model, model)
    live = LiveServer(settings(model))
    try:
        before = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_sha256
        model.write_bytes(b"not a model any more")
        os.kill(live.server.engine.proc.pid, signal.SIGKILL)
        wait_for(lambda: live.server.engine.stats["restarts"] == 1, "the engine process was not replaced")
        wait_for(lambda: check(live.channel, "") == SERVING, "health did not come back")
        assert live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_sha256 == before
        assert len(list(live.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=20), timeout=30))) == 20
    finally:
        live.close()


def engine_process_of(server: int) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == server:
                    return int(entry)
            except OSError:
                continue
    raise AssertionError(f"server {server} has no engine process")


# The engine process, except that it fails at once while MARKER exists: restarts that cannot succeed.
FAILING_CHILD = ("import os, sys\n"
                 "if os.path.exists(os.environ['MARKER']): sys.exit(3)\n"
                 "from serve.process.child import main\n"
                 "sys.exit(main(sys.argv[1:]))\n")
SERVER = ("import sys\n"
          "from serve.process import proxy\n"
          f"proxy.CHILD = [sys.executable, '-c', {FAILING_CHILD!r}]\n"
          "from serve.__main__ import main\n"
          "sys.exit(main())\n")


def test_liveness_holds_while_restarts_fail_then_the_server_exits_non_zero(text_model, tmp_path):
    marker = tmp_path / "fail"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "--model", str(text_model), "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MARKER": str(marker)})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        match = re.search(r" on (127\.0\.0\.1:\d+) ", line)
        assert match, f"no ready line: {line!r}"
        pid = engine_process_of(proc.pid)
        with grpc.insecure_channel(match.group(1)) as channel:
            assert [check(channel, name) for name in NAMES] == [SERVING] * len(NAMES)
            marker.touch()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: check(channel, "") == NOT_SERVING, "readiness stayed SERVING")
            assert [check(channel, name) for name in READINESS[1:]] == [NOT_SERVING] * 2
            assert kserve_ready(channel) == (False, False)  # KServe's probes say what health says
            assert check(channel, "liveness") == SERVING  # restarts are still being tried
        assert proc.wait(timeout=60) == 1
        stderr = proc.stderr.read()
        assert "could not be restarted (5 attempts in a row)" in stderr, stderr
        assert stderr.count("could not be restarted (") >= 5, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
