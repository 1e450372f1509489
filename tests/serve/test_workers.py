"""`--workers N`: N server processes on one port through SO_REUSEPORT, one ready line, one stop request
however many processes the signal reaches, one metrics endpoint."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

READY = re.compile(r"^charrnn serving .+ on (127\.0\.0\.1:\d+) \(CPUExecutionProvider, 2 worker processes\)$")


def test_two_workers_share_one_port_and_stop_together(hihell_model, tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(hihell_model), "--workers", "2"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline().strip()
        match = READY.match(line)
        assert match, f"no ready line: {line!r}\n{log.read_text()}"
        target = match.group(1)
        # Each channel with its own subchannel pool opens its own connection; the kernel spreads
        # connections over the two processes, so 16 of them reach both (all on one: p = 2**-15).
        for _ in range(16):
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = pb_grpc.CharRNNStub(channel)
                replies = list(stub.Predict(iter([pb.PredictRequest(text="hihell")]), timeout=10))
                assert "".join(r.next for r in replies) == "ihello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    served = set(re.findall(r"(worker\d) serve\.api\.grpc\.interceptors: Predict", log.read_text()))
    assert served == {"worker0", "worker1"}, log.read_text()


def test_workers_refuse_a_missing_model_with_its_name(tmp_path):
    missing = tmp_path / "nope.onnx"
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(missing), "--workers", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and proc.stdout == ""


def start_workers(model, *args: str, log) -> tuple[subprocess.Popen, list[str]]:
    """`python -m serve --workers 2` in a session of its own (as a terminal's job is a process group of its
    own); its stdout lines but the HTTP one (the ready line, then the metrics line when asked for)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(model), "--workers", "2", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    lines = [proc.stdout.readline().strip() for _ in range(3 if "--metrics-port" in args else 2)]
    if not lines[1].startswith("charrnn http on http://127.0.0.1:"):
        stop_group(proc)
        pytest.fail(f"no HTTP line: {lines!r}")
    del lines[1]
    if not READY.match(lines[0]):
        stop_group(proc)
        pytest.fail(f"no ready line: {lines!r}")
    return proc, lines


def stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def group_is_gone(pgid: int, within: float = 10.0) -> bool:
    """True once no process of the group is left (a worker or an engine process outliving the parent)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def connections(target: str, n: int = 16) -> list[grpc.Channel]:
    """n channels with a connection each: the kernel spreads them over the two workers (all on one: 2**-15)."""
    return [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]


def served_by(log_text: str, rpc: str) -> set[str]:
    return set(re.findall(rf"(worker\d) serve\.api\.grpc\.interceptors: {rpc} ", log_text))


class Streams:
    """One Generate stream per connection, read on threads; `results` holds OK or (code, details)."""

    def __init__(self, target: str, chars: int) -> None:
        self.channels = connections(target)
        self.chars = chars
        self.received = [0] * len(self.channels)
        self.results: list[object] = [None] * len(self.channels)
        self.threads = [threading.Thread(target=self._read, args=(i,)) for i in range(len(self.channels))]
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 60
        while not all(self.received):
            assert time.monotonic() < deadline, f"streams did not start: {self.received}"
            time.sleep(0.005)

    def _read(self, i: int) -> None:
        try:
            for _ in pb_grpc.CharRNNStub(self.channels[i]).Generate(
                    pb.GenerateRequest(prompt="it was", max_chars=self.chars, seed=i), timeout=120):
                self.received[i] += 1
            self.results[i] = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.results[i] = (error.code(), error.details())

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=120)
        for channel in self.channels:
            channel.close()


def test_ctrl_c_to_the_process_group_drains_every_worker(text_model, tmp_path):
    """The terminal signals the parent and every worker at once; that is one request: calls in flight
    finish, every process exits 0, none is left."""
    chars = 1500
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc, (line,) = start_workers(text_model, "--max-chars", str(chars), "--grace", "60", log=err)
    try:
        streams = Streams(READY.match(line).group(1), chars)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        in_flight = sum(streams.received) < len(streams.channels) * chars
        streams.join()
        assert proc.wait(timeout=60) == 0
        assert group_is_gone(proc.pid), "a process of the server outlived it"
    finally:
        stop_group(proc)
    assert in_flight, "the streams had finished before the signal: the test proves nothing"
    n = len(streams.channels)
    assert streams.results == [grpc.StatusCode.OK] * n and streams.received == [chars] * n
    assert served_by(log.read_text(), "Generate") == {"worker0", "worker1"}, log.read_text()
    assert "Traceback" not in log.read_text()


def test_a_second_ctrl_c_cuts_the_calls_in_every_worker(text_model, tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc, (line,) = start_workers(text_model, "--max-chars", "100000", "--max-batch", "1", "--grace", "60",
                                      log=err)
    try:
        streams = Streams(READY.match(line).group(1), 100_000)
        started = time.monotonic()
        for _ in range(2):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.3)
        streams.join()
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 30  # cut, not the 60 s grace
        assert group_is_gone(proc.pid), "a process of the server outlived it"
    finally:
        stop_group(proc)
    for result, received in zip(streams.results, streams.received, strict=True):
        assert isinstance(result, tuple) and result[0] == grpc.StatusCode.UNAVAILABLE, result
        assert "second SIGTERM" in result[1] and 0 < received < 100_000


def test_workers_refuse_a_metrics_port_in_use(hihell_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(hihell_model), "--workers", "2",
                               "--metrics-port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"--metrics-port {port}: cannot bind" in proc.stderr and "Traceback" not in proc.stderr


def children_of(pid: int) -> list[str]:
    """The command lines of pid's children (multiprocessing's resource tracker is one of them)."""
    lines = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            lines.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return lines


@pytest.mark.parametrize("to_group", [False, True], ids=["parent", "group"])
def test_a_sigterm_while_the_workers_start_stops_them_all(hihell_model, tmp_path, to_group):
    """SIGTERM as soon as the first worker exists (the model not loaded yet): everything exits 0 and no
    worker or engine process is left behind."""
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(hihell_model), "--workers", "2"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any("multiprocessing.spawn" in cmdline for cmdline in children_of(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.001)
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert group_is_gone(proc.pid), "a worker outlived its parent"
        assert proc.stdout.read() == ""  # never announced ready
    finally:
        stop_group(proc)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_one_metrics_endpoint_sums_every_worker(hihell_model, tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc, (line, metrics_line) = start_workers(hihell_model, "--metrics-port", "0", log=err)
    try:
        match = re.match(r"^charrnn metrics on (http://127\.0\.0\.1:\d+/metrics)$", metrics_line)
        assert match, metrics_line
        channels = connections(READY.match(line).group(1))
        for channel in channels:
            replies = list(pb_grpc.CharRNNStub(channel).Generate(pb.GenerateRequest(prompt="hi", max_chars=5),
                                                                  timeout=10))
            assert len(replies) == 5
            channel.close()
        text = urllib.request.urlopen(match.group(1), timeout=10).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        folder = re.search(r"the workers count into (\S+), served summed", log.read_text()).group(1)
        assert Path(folder).is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_group(proc)
    assert served_by(log.read_text(), "Generate") == {"worker0", "worker1"}, log.read_text()
    assert samples[("charrnn_calls_total", (("code", "OK"), ("rpc", "Generate"), ("surface", "grpc")))] == 16
    assert samples[("charrnn_characters_generated_total", ())] == 16 * 5
    assert samples[("charrnn_time_to_first_char_seconds_count", (("surface", "grpc"),))] == 16
    assert samples[("charrnn_active_streams", ())] == 0  # one series, not one per process
    assert not Path(folder).exists(), "the metrics folder outlived the server"
