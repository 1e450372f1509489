"""`--workers N`: N server processes on one port through SO_REUSEPORT, one ready line, one SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import grpc

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from support import ROOT

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
    served = set(re.findall(r"(worker\d) serve\.api\.interceptors: Predict", log.read_text()))
    assert served == {"worker0", "worker1"}, log.read_text()


def test_workers_refuse_a_missing_model_with_its_name(tmp_path):
    missing = tmp_path / "nope.onnx"
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", str(missing), "--workers", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and proc.stdout == ""
