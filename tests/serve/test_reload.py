"""The served model follows its --model file (serve/ops/reload.py): real servers on 127.0.0.1 port 0
with a short --reload-interval, the file replaced atomically (os.replace, as export does) under them.

Model A is the GRU trained on the tiny corpus, model B the hihell model: another vocabulary, cell and
state size, so a call that ran on the wrong model would show it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live import LiveServer
from support import ROOT, run_stage

from export import repository
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.inference import grpc_service_pb2 as kpb
from serve.api.pb.inference import grpc_service_pb2_grpc as kgrpc
from serve.ops.settings import Settings, parse

INTERVAL = 0.2  # seconds between checks of the file in these tests
BOUND = 60.0  # seconds a switch may take on a busy 2-core machine (it takes about one interval + a load)
SERVING = health_pb2.HealthCheckResponse.SERVING


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replace(target: Path, source: Path | bytes) -> None:
    """What export does: a whole new file renamed over the old one (a reader never sees half of it)."""
    tmp = target.with_name(target.name + ".new")
    if isinstance(source, Path):
        shutil.copyfile(source, tmp)
    else:
        tmp.write_bytes(source)
    os.replace(tmp, target)


def wait_for(condition: Callable[[], object], what: str, bound: float = BOUND) -> float:
    """Seconds until condition() is true; fails after `bound`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < bound, f"{what} within {bound:g} s"
        time.sleep(0.02)
    return time.monotonic() - start


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def served_shas(port: int) -> list[str]:
    """The SHA-256 of each model_info row at 1 (one row per server; with --workers one per worker)."""
    return sorted(re.findall(r'^charrnn_model_info\{(?:pid="\d+",)?sha256="([0-9a-f]{64})",version="\d+"\} 1\.0$',
                             metrics(port),
                             re.M))


def reloads(port: int, result: str) -> float:
    found = re.search(rf'^charrnn_model_reloads_total\{{result="{result}"\}} (\S+)$', metrics(port), re.M)
    assert found, metrics(port)
    return float(found.group(1))


@pytest.fixture()
def models(text_model: Path, hihell_model: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(the served path, holding A; A; B)"""
    path = tmp_path / "model.onnx"
    shutil.copyfile(text_model, path)
    return path, text_model, hihell_model


@pytest.fixture()
def live(models) -> Iterator[LiveServer]:
    path, _, _ = models
    server = LiveServer(Settings(model=str(path), device="cpu", reload_interval=INTERVAL, metrics_port=0))
    try:
        yield server
    finally:
        server.close()


def sha(live: LiveServer) -> str:
    return live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_sha256


def infer(stub: kgrpc.GRPCInferenceServiceStub, ids: list[int], sequence: int, start: bool = False):
    parameters = {"sequence_id": kpb.InferParameter(int64_param=sequence)}
    if start:
        parameters["sequence_start"] = kpb.InferParameter(bool_param=True)
    request = kpb.ModelInferRequest(model_name="charrnn", parameters=parameters, inputs=[
        kpb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, len(ids)],
                                               contents=kpb.InferTensorContents(int64_contents=ids))])
    return stub.ModelInfer(request, timeout=20)


def test_a_replaced_file_serves_new_calls_while_calls_in_flight_finish_on_the_old_model(live, models):
    path, a, b = models
    kserve = kgrpc.GRPCInferenceServiceStub(live.channel)
    old_engine = live.server.engine
    a_info = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert a_info.model_sha256 == sha256_of(a)
    old_state = live.stub.Step(pb.StepRequest(text="it was"), timeout=10).state
    infer(kserve, [list(a_info.vocab).index(c) for c in "it"], sequence=7, start=True)
    # A Generate stream on A, read a little and then not at all: the engine parks it a window ahead,
    # so it is still in flight when the file changes.
    stream = live.stub.Generate(pb.GenerateRequest(prompt="it was", max_chars=20_000, seed=3), timeout=120)
    first = [next(stream).text for _ in range(10)]

    replace(path, b)
    seconds = wait_for(lambda: sha(live) == sha256_of(b), "GetModelInfo reports the new file")
    logging.getLogger(__name__).info("switched %.2f s after the file was replaced", seconds)

    b_info = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (b_info.cell, b_info.state_size, list(b_info.vocab)) != (a_info.cell, a_info.state_size,
                                                                   list(a_info.vocab))
    assert live.server.engine is not old_engine and old_engine.running, "the old engine serves its calls"
    rest = [c.text for c in stream]
    text = "".join(first + rest)
    assert len(text) == 20_000, "the stream that started on A ran to its end"
    assert set(text) - set(b_info.vocab), "and on A: it holds characters B does not know"
    wait_for(lambda: old_engine.proc.poll() is not None, "the old engine stops after its last call")

    new = "".join(c.text for c in live.stub.Generate(pb.GenerateRequest(max_chars=200, seed=3), timeout=30))
    assert set(new) <= set(b_info.vocab), "new calls run on B"
    fresh = live.stub.Step(pb.StepRequest(text=b_info.vocab[0]), timeout=10)
    assert live.stub.Step(pb.StepRequest(state=fresh.state, text=b_info.vocab[0]), timeout=10).next

    with pytest.raises(grpc.RpcError) as refused:
        live.stub.Step(pb.StepRequest(state=old_state, text=b_info.vocab[0]), timeout=10)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION, "the another-model status"
    assert "another model" in refused.value.details() and sha256_of(b)[:12] in refused.value.details()

    with pytest.raises(grpc.RpcError) as gone:
        infer(kserve, [0], sequence=7)
    assert gone.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "reloaded its model file" in gone.value.details() and "sequence_start" in gone.value.details()
    assert infer(kserve, [0], sequence=7, start=True).outputs  # started again: on B
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="charrnn"), timeout=10)
    assert [list(t.shape) for t in meta.inputs if t.name == "state_in"] == [[-1, b_info.num_layers,
                                                                           b_info.state_size]]
    assert [list(t.shape) for t in meta.outputs if t.name == "logits"] == [[-1, -1, len(b_info.vocab)]]

    port = live.server.metrics_port
    assert served_shas(port) == [sha256_of(b)], "model_info holds the served model only"
    assert (reloads(port, "ok"), reloads(port, "refused")) == (1, 0)


def test_a_bad_or_missing_file_is_refused_and_the_old_model_kept(live, models, caplog):
    path, a, b = models
    port = live.server.metrics_port
    health = health_pb2_grpc.HealthStub(live.channel)
    caplog.set_level(logging.ERROR, logger="serve.ops.reload")
    refused = 0.0
    for broken in (b"not an onnx file", b.read_bytes()[:len(b.read_bytes()) // 2], None):
        if broken is None:
            path.unlink()
        else:
            replace(path, broken)
        wait_for(lambda refused=refused: reloads(port, "refused") == refused + 1, "the reload is refused and counted")
        refused += 1
        assert "model reload refused" in caplog.text and str(path) in caplog.text
        caplog.clear()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        assert sha(live) == sha256_of(a)
        assert len(list(live.stub.Generate(pb.GenerateRequest(prompt="it", max_chars=30), timeout=30))) == 30
    time.sleep(5 * INTERVAL)
    assert reloads(port, "refused") == 3, "a file refused once is not refused again at every check"
    assert served_shas(port) == [sha256_of(a)]

    replace(path, b)  # a good file after bad ones is taken
    wait_for(lambda: sha(live) == sha256_of(b), "the good file is served")
    assert (reloads(port, "ok"), reloads(port, "refused")) == (1, 3)


def test_an_unchanged_file_touched_is_not_reloaded(live, models):
    path, a, _ = models
    replace(path, a)  # the same bytes under a new inode and times
    time.sleep(10 * INTERVAL)
    port = live.server.metrics_port
    assert (reloads(port, "ok"), reloads(port, "refused")) == (0, 0)


def test_exporting_the_same_checkpoint_again_does_not_reload(live, models, text_runs):
    """Reproducible export (issue 22): the same checkpoint exported over the served file gives the same
    bytes, so the server sees a new inode and times but the served SHA-256, and loads nothing."""
    path, a, _ = models
    before = path.read_bytes()
    run_stage("export", str(text_runs["gru"]), "--out", str(path))
    assert path.read_bytes() == before
    time.sleep(10 * INTERVAL)
    port = live.server.metrics_port
    assert (reloads(port, "ok"), reloads(port, "refused")) == (0, 0)
    assert sha(live) == sha256_of(a)


def test_a_repository_serves_its_highest_version_and_follows_a_new_one_and_a_rollback(models, tmp_path):
    """--model-repository (issue 22): version 1 is A; export publishes B as version 2 and every surface says
    version 2 serves; a rollback retires 2 and the server is back on 1, no restart; B's Step state is refused
    with the another-model status."""
    _, a, b = models
    folder = tmp_path / "models" / "charrnn"
    assert repository.publish(folder, a.read_bytes(), {}).version == 1
    live = LiveServer(Settings(model_repository=str(tmp_path / "models"), device="cpu", reload_interval=INTERVAL,
                               metrics_port=0))
    kserve = kgrpc.GRPCInferenceServiceStub(live.channel)
    try:
        info = live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert (info.model_sha256, info.model_version) == (sha256_of(a), "1")
        assert repository.publish(folder, b.read_bytes(), {}).version == 2
        wait_for(lambda: live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_version == "2",
                 "the server switches to version 2")
        assert sha(live) == sha256_of(b)
        assert list(kserve.ModelMetadata(kpb.ModelMetadataRequest(name="charrnn"), timeout=10).versions) == ["2"]
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="charrnn", version="2"), timeout=10).ready
        with pytest.raises(grpc.RpcError) as old:
            kserve.ModelReady(kpb.ModelReadyRequest(name="charrnn", version="1"), timeout=10)
        assert old.value.code() is grpc.StatusCode.NOT_FOUND
        vocab = list(live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).vocab)
        request = kpb.ModelInferRequest(model_name="charrnn", model_version="2", inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, 1],
                                                   contents=kpb.InferTensorContents(int64_contents=[0]))])
        assert kserve.ModelInfer(request, timeout=20).model_version == "2"
        assert re.search(rf'charrnn_model_info\{{sha256="{sha256_of(b)}",version="2"\}} 1\.0',
                         metrics(live.server.metrics_port))
        with urllib.request.urlopen(f"{live.http_url}/v1/models", timeout=10) as response:
            assert b'"version":"2"' in response.read().replace(b" ", b"")
        state = live.stub.Step(pb.StepRequest(text=vocab[0]), timeout=10).state

        assert repository.rollback(folder) == (2, 1)
        seconds = wait_for(lambda: sha(live) == sha256_of(a), "the server is back on version 1")
        print(f"rollback -> serving version 1: {seconds:.2f} s (interval {INTERVAL} s)")
        assert live.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_version == "1"
        with pytest.raises(grpc.RpcError) as refused:
            live.stub.Step(pb.StepRequest(state=state, text="i"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert (reloads(live.server.metrics_port, "ok"), reloads(live.server.metrics_port, "refused")) == (2, 0)
    finally:
        live.close()


def test_the_model_and_repository_settings():
    assert parse(["--model-repository", "r"], {}).source == "r/charrnn"
    assert parse([], {"CHARRNN_MODEL_REPOSITORY": "r", "CHARRNN_MODEL_VERSION": "3"}).model_version == 3
    for argv in ([], ["--model", "m", "--model-repository", "r"], ["--model", "m", "--model-version", "2"]):
        with pytest.raises(SystemExit):
            parse(argv, {})


def test_a_repository_without_a_version_refuses_to_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serve", "--model-repository", str(tmp_path), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no model repository folder" in proc.stderr


class Workers:
    """`python -m serve --workers 2` as a user runs it; the parent serves every worker's metrics."""

    def __init__(self, model: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "--model", str(model), "--device", "cpu", "--workers", "2",
             "--metrics-port", "0", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.errors: list[str] = []
        threading.Thread(target=lambda: self.errors.extend(self.proc.stderr), daemon=True).start()
        ready, _http, announced = (self.proc.stdout.readline() for _ in range(3))
        assert " on 127.0.0.1:" in ready, (ready, self.errors)
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", announced)
        assert found, (announced, self.errors)
        self.metrics_port = int(found.group(1))

    def served(self) -> list[str]:
        return served_shas(self.metrics_port)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.errors


def test_sighup_checks_at_once_in_every_worker(models):
    path, a, b = models
    workers = Workers(path, "--reload-interval", "0")  # no polling: only SIGHUP checks
    try:
        assert workers.served() == [sha256_of(a)] * 2
        replace(path, b)
        time.sleep(1.0)
        assert workers.served() == [sha256_of(a)] * 2, "--reload-interval 0: no polling"
        workers.proc.send_signal(signal.SIGHUP)  # the parent passes it to every worker
        seconds = wait_for(lambda: workers.served() == [sha256_of(b)] * 2, "every worker serves B")
        print(f"SIGHUP to both workers serving the new model: {seconds:.2f} s")
        assert workers.proc.poll() is None, "SIGHUP does not stop the server"
    finally:
        workers.close()
    assert any("SIGHUP: checking the model file" in line for line in workers.errors)


def test_every_worker_follows_the_file_within_an_interval_and_a_load(models):
    path, a, b = models
    workers = Workers(path, "--reload-interval", "1")
    try:
        assert workers.served() == [sha256_of(a)] * 2
        replace(path, b)
        seconds = wait_for(lambda: workers.served() == [sha256_of(b)] * 2, "every worker serves B")
        print(f"file replaced -> both workers serving the new model: {seconds:.2f} s (interval 1 s)")
    finally:
        workers.close()


def test_the_reload_interval_setting():
    assert parse(["--model", "m"], {}).reload_interval == 10.0
    assert parse(["--model", "m"], {"CHARRNN_RELOAD_INTERVAL": "2.5"}).reload_interval == 2.5
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--reload-interval", "-1"], {})
    assert parse(["--model", "m", "--reload-interval", "0"], {}).reload_interval == 0
