"""inference.GRPCInferenceService through the real tritonclient.grpc (sync, aio and streaming), against
real servers on 127.0.0.1 port 0. The client side runs in .venv-triton (tests/tritonside/kserve.py);
what it got is checked here against onnxruntime run directly on the file.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from kserve_reference import _argmax, _array, random_inputs
from live import LiveServer, serve_model
from prometheus_client.parser import text_string_to_metric_families
from tritonenv import run_tritonside

from export.triton_repo import TritonModel, config_pbtxt
from serve.api.pb.charrnn.v1 import charrnn_pb2 as charrnn_pb
from serve.api.pb.inference import grpc_service_pb2 as pb
from serve.ops.version import project_version

INVALID, NOT_FOUND, EXHAUSTED = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.RESOURCE_EXHAUSTED"


def triton(server: LiveServer, *calls: dict) -> list[dict]:
    return run_tritonside("kserve.py", server.target, stdin=list(calls))


@pytest.fixture(scope="module")
def short_lived(hihell_model: Path) -> Iterator[LiveServer]:
    """Sequences idle for 1 s are freed; at most 2 live at once."""
    yield from serve_model(hihell_model, sequence_idle_seconds=1.0, max_sequences=2)


def test_probes_and_metadata(hihell_server, hihell, hihell_model):
    live, ready, model_ready, server, model, config, unknown = triton(
        hihell_server, {"op": "live"}, {"op": "ready"}, {"op": "model_ready"}, {"op": "server_metadata"},
        {"op": "model_metadata"}, {"op": "model_config"}, {"op": "model_metadata", "model": "nope"})
    assert live == {"live": True} and ready == {"ready": True} and model_ready == {"ready": True}
    assert server["name"] == "charrnn" and server["version"] == project_version()
    assert {"sequence", "sequence(string_id)", "model_configuration"} <= set(server["extensions"])
    layers, size = (str(n) for n in hihell.state_shape)
    assert model["name"] == "charrnn" and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": ["-1", "-1"]},
                               {"name": "state_in", "datatype": "FP32", "shape": ["-1", layers, size]}]
    hidden = hihell.meta["hidden_size"]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "-1", str(len(hihell.vocab))]},
                                {"name": "state_out", "datatype": "FP32", "shape": ["-1", layers, size]},
                                {"name": "hidden", "datatype": "FP32", "shape": ["-1", "-1", layers, hidden]}]
    # ModelConfig is the configuration export writes into config.pbtxt for this file, field for field.
    exported = text_format.Parse(config_pbtxt(TritonModel.of(hihell.meta, "charrnn", hihell.outputs)),
                                 pb.ModelConfig())
    assert config["config"] == json_format.MessageToDict(exported, preserving_proto_field_name=True)
    assert unknown["error"]["status"] == NOT_FOUND and "'nope'" in unknown["error"]["message"]


def test_explicit_state_matches_onnxruntime(text_server, text):
    ids, state, batch_ids, batch_state = random_inputs(text)
    one = {"ids": ids.tolist(), "state": state.tolist()}
    raw, typed, batched, concurrent = triton(
        text_server, {"op": "infer", **one}, {"op": "typed", **one},
        {"op": "infer", "ids": batch_ids.tolist(), "state": batch_state.tolist()},
        {"op": "concurrent", "calls": [{"ids": batch_ids[i:i + 1].tolist(), "state": batch_state[i:i + 1].tolist()}
                                       for i in range(4)]})
    logits, state_out = text.run(ids, state)
    for result in (raw, typed):  # raw_input_contents and typed contents
        assert np.abs(_array(result["outputs"]["logits"]) - logits).max() <= 1e-6
        assert np.abs(_array(result["outputs"]["state_out"]) - state_out).max() <= 1e-6
    logits, state_out = text.run(batch_ids, batch_state)
    assert np.abs(_array(batched["outputs"]["logits"]) - logits).max() <= 1e-5
    assert np.abs(_array(batched["outputs"]["state_out"]) - state_out).max() <= 1e-5
    for i, result in enumerate(concurrent):
        assert np.abs(_array(result["outputs"]["logits"]) - logits[i:i + 1]).max() <= 1e-5


def test_requested_outputs_are_honoured(hihell_server, hihell):
    only_state, = triton(hihell_server, {"op": "infer", "ids": [hihell.ids("hi")], "outputs": ["state_out"]})
    assert set(only_state["outputs"]) == {"state_out"}
    _, state_out = hihell.run(np.array([hihell.ids("hi")]))
    assert np.abs(_array(only_state["outputs"]["state_out"]) - state_out).max() <= 1e-6


def test_hidden_only_when_asked_for(hihell_server, hihell):
    """`hidden` is listed but never sent unasked; asked for, it is the file's own output, under a sequence too."""
    ids = np.array([hihell.ids("hihell")])
    default, asked, in_sequence = triton(
        hihell_server, {"op": "infer", "ids": ids.tolist()},
        {"op": "infer", "ids": ids.tolist(), "outputs": ["logits", "hidden"]},
        {"op": "infer", "ids": ids.tolist(), "outputs": ["hidden"], "sequence_id": 77, "start": True, "end": True})
    assert set(default["outputs"]) == {"logits", "state_out"}
    assert set(asked["outputs"]) == {"logits", "hidden"} and set(in_sequence["outputs"]) == {"hidden"}
    want = hihell.hidden(ids)
    for result in (asked, in_sequence):
        got = _array(result["outputs"]["hidden"])
        assert got.shape == want.shape == (1, 6, *hihell.state_shape)  # the seed lesson: 1 layer of 5 units
        assert np.abs(got - want).max() <= 1e-6


def test_a_hihell_sequence_gives_ihello(hihell_server, hihell):
    steps = [{"op": "infer", "ids": [hihell.ids(c)], "sequence_id": 41, "start": i == 0, "end": i == 5}
             for i, c in enumerate("hihell")]
    results = triton(hihell_server, *steps, {"op": "infer", "ids": [hihell.ids("o")], "sequence_id": 41})
    assert "".join(_argmax(r, hihell.vocab) for r in results[:6]) == "ihello"
    assert set(results[0]["outputs"]) == {"logits"}  # state_out only when asked for
    ended = results[6]["error"]
    assert ended["status"] == INVALID and "sequence_start" in ended["message"] and "41" in ended["message"]


def test_a_streamed_sequence_with_a_string_id(hihell_server, hihell):
    calls = [{"ids": [hihell.ids(c)], "sequence_id": "reader-7", "start": i == 0, "end": i == 5,
              "outputs": ["logits", "state_out"]} for i, c in enumerate("hihell")]
    results, = triton(hihell_server, {"op": "stream", "calls": calls})
    assert "".join(_argmax(r, hihell.vocab) for r in results) == "ihello"
    _, state_out = hihell.run(np.array([hihell.ids("hihell")]))
    assert np.abs(_array(results[-1]["outputs"]["state_out"]) - state_out).max() <= 1e-5


def test_interleaved_sequences_do_not_mix(hihell_server, hihell):
    texts = {7: "hihell", 8: "hell"}
    calls = []
    for i in range(6):
        for sid, t in texts.items():
            if i < len(t):
                calls.append((sid, i, {"op": "infer", "ids": [hihell.ids(t[i])], "sequence_id": sid,
                                       "start": i == 0, "end": i == len(t) - 1}))
    results = triton(hihell_server, *(c for _, _, c in calls))
    for (sid, i, _), result in zip(calls, results, strict=True):
        logits, _ = hihell.run(np.array([hihell.ids(texts[sid][:i + 1])]))
        assert np.abs(_array(result["outputs"]["logits"])[0, -1] - logits[0, -1]).max() <= 1e-5, (sid, i)


def test_one_sequence_from_concurrent_calls_runs_each_request_once(hihell_server, hihell):
    # Four 'l's at once on one sequence: whatever their order, the state must be that of "he" + "llll"
    # (two run side by side from one state would lose one).
    start, = triton(hihell_server, {"op": "infer", "ids": [hihell.ids("he")], "sequence_id": 99, "start": True})
    assert "error" not in start
    l_call = {"ids": [hihell.ids("l")], "sequence_id": 99}
    results = triton(hihell_server, {"op": "concurrent", "calls": [l_call] * 4},
                     {"op": "infer", "ids": [hihell.ids("o")], "sequence_id": 99, "end": True,
                      "outputs": ["state_out"]})
    assert all("error" not in r for r in results[0])
    _, state_out = hihell.run(np.array([hihell.ids("hellllo")]))
    assert np.abs(_array(results[1]["outputs"]["state_out"]) - state_out).max() <= 1e-5


def test_a_second_start_restarts_the_sequence(hihell_server, hihell):
    results = triton(hihell_server,
                     {"op": "infer", "ids": [hihell.ids("hih")], "sequence_id": 5, "start": True},
                     {"op": "infer", "ids": [hihell.ids("h")], "sequence_id": 5, "start": True,
                      "outputs": ["state_out"]},
                     {"op": "infer", "ids": [hihell.ids("e")], "sequence_id": 5, "end": True})
    _, fresh = hihell.run(np.array([hihell.ids("h")]))
    assert np.abs(_array(results[1]["outputs"]["state_out"]) - fresh).max() <= 1e-6
    logits, _ = hihell.run(np.array([hihell.ids("he")]))
    assert np.abs(_array(results[2]["outputs"]["logits"])[0, -1] - logits[0, -1]).max() <= 1e-5


def test_idle_sequences_expire_and_the_cap_refuses_more(short_lived, hihell):
    h = [hihell.ids("h")]
    results = triton(short_lived,
                     {"op": "infer", "ids": h, "sequence_id": 1, "start": True},
                     {"op": "infer", "ids": h, "sequence_id": 2, "start": True},
                     {"op": "infer", "ids": h, "sequence_id": 3, "start": True},
                     {"op": "infer", "ids": h, "sequence_id": 1, "end": True},
                     {"op": "infer", "ids": h, "sequence_id": 3, "start": True},
                     {"op": "sleep", "seconds": 2.5},
                     {"op": "infer", "ids": h, "sequence_id": 2},
                     {"op": "infer", "ids": h, "sequence_id": 4, "start": True},
                     {"op": "infer", "ids": h, "sequence_id": 5, "start": True})
    assert results[2]["error"]["status"] == EXHAUSTED and "--max-sequences" in results[2]["error"]["message"]
    assert "error" not in results[3] and "error" not in results[4]  # END freed a place
    expired = results[6]["error"]
    assert expired["status"] == INVALID and "idle" in expired["message"]
    assert "error" not in results[7] and "error" not in results[8]  # expiry freed both places


def _bad(**request) -> dict:
    return {"op": "request", **request}


def test_bad_requests_name_what_is_wrong(hihell_server, hihell):
    ids = {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "values": [0, 1]}
    layers, size = hihell.state_shape
    state = {"name": "state_in", "datatype": "FP32", "shape": [1, layers, size], "values": [0.0] * (layers * size)}
    cases = [
        (_bad(inputs=[ids], model="other"), NOT_FOUND, "'other'"),
        (_bad(inputs=[ids], version="2"), NOT_FOUND, "'2'"),
        (_bad(inputs=[{**ids, "name": "tokens"}]), INVALID, "'tokens'"),
        (_bad(inputs=[{**ids, "datatype": "INT32"}]), INVALID, "input 'input_ids': datatype INT32"),
        (_bad(inputs=[{**ids, "shape": [2]}]), INVALID, "input 'input_ids': shape [2]"),
        (_bad(inputs=[{**ids, "values": [0, 1, 2]}]), INVALID, "input 'input_ids': contents hold 3 values"),
        (_bad(inputs=[{**ids, "values": [0, len(hihell.vocab)]}]), INVALID, "outside the vocabulary"),
        (_bad(inputs=[{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "raw": "00" * 12}]), INVALID,
         "input 'input_ids': raw contents hold 12 bytes"),
        (_bad(inputs=[ids, {**state, "shape": [1, layers + 1, size], "values": [0.0] * ((layers + 1) * size)}]),
         INVALID, "input 'state_in': shape"),
        (_bad(inputs=[ids], outputs=["probabilities"]), INVALID, "output 'probabilities'"),
        (_bad(inputs=[ids, state], sequence_id=3, start=True), INVALID, "state_in"),
        (_bad(inputs=[ids], sequence_id=12345), INVALID, "sequence_start"),
        (_bad(inputs=[]), INVALID, "'input_ids' is missing"),
    ]
    results = triton(hihell_server, *(c for c, _, _ in cases))
    for (call, status, fragment), result in zip(cases, results, strict=True):
        assert "error" in result, call
        assert result["error"]["status"] == status and fragment in result["error"]["message"], (call, result)


def test_a_stream_answers_every_request_in_order_through_an_error(hihell_server, hihell):
    calls = [{"ids": [hihell.ids("h")]}, {"ids": [hihell.ids("h")], "model": "other"},
             {"ids": [hihell.ids("hi")]}, {"ids": [hihell.ids("e")], "sequence_id": 777}]
    results, = triton(hihell_server, {"op": "stream", "calls": calls})
    assert _argmax(results[0], hihell.vocab) == "i"
    assert "'other'" in results[1]["error"]["message"]
    assert _argmax(results[2], hihell.vocab) == "ih"
    assert "sequence_start" in results[3]["error"]["message"]


@pytest.fixture(scope="module")
def token_server(hihell_model: Path) -> Iterator[LiveServer]:
    yield from serve_model(hihell_model, auth_token="s3cret")


def test_the_token_guards_inference_but_not_the_probes(token_server, hihell):
    live, infer, with_token = triton(
        token_server, {"op": "live"}, {"op": "infer", "ids": [hihell.ids("h")]},
        {"op": "infer", "ids": [hihell.ids("h")], "headers": {"authorization": "Bearer s3cret"}})
    assert live == {"live": True}
    assert infer["error"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert _argmax(with_token, hihell.vocab) == "i"


@pytest.fixture(scope="module")
def thread_server(text_model: Path) -> Iterator[LiveServer]:
    yield from serve_model(text_model, engine="thread")


def test_a_batch_is_one_engine_call(thread_server, text):
    stats = thread_server.server.engine.stats
    before = stats["job_calls"]
    ids = np.random.default_rng(1).integers(0, len(text.vocab), size=(4, 6))
    result, = triton(thread_server, {"op": "infer", "ids": ids.tolist()})
    assert stats["job_calls"] == before + 1  # the four rows went into one onnxruntime call
    logits, _ = text.run(ids)
    assert np.abs(_array(result["outputs"]["logits"]) - logits).max() <= 1e-5


def test_a_draining_server_is_live_but_not_ready(thread_server, text):
    thread_server.server.gate.draining = True  # what SIGTERM's drain sets first (serve/ops/server.py)
    try:
        live, ready, infer = triton(thread_server, {"op": "live"}, {"op": "ready"},
                                    {"op": "infer", "ids": [[0, 1]]})
    finally:
        thread_server.server.gate.draining = False
    assert live == {"live": True} and ready == {"ready": False}
    assert infer["error"]["status"] == "StatusCode.UNAVAILABLE"


@pytest.fixture(scope="module")
def one_call_server(text_model: Path) -> Iterator[LiveServer]:
    yield from serve_model(text_model, max_streams=1, metrics_port=0)


def _calls_total(server: LiveServer, rpc: str, code: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
    return sum(s.value for family in text_string_to_metric_families(text.decode()) for s in family.samples
               if s.name == "charrnn_calls_total" and s.labels == {"rpc": rpc, "code": code, "surface": "grpc"})


def test_modelinfer_shares_the_call_limit_and_the_metrics(one_call_server, text):
    generate = one_call_server.stub.Generate(charrnn_pb.GenerateRequest(prompt="it", max_chars=100_000, seed=1),
                                             timeout=60)
    next(generate)  # holds the one slot
    try:
        live, refused = triton(one_call_server, {"op": "live"}, {"op": "infer", "ids": [[0, 1]]})
    finally:
        generate.cancel()
    assert live == {"live": True}  # a probe takes no slot
    assert refused["error"]["status"] == EXHAUSTED
    deadline = time.monotonic() + 10
    while True:  # the cancelled stream frees its slot within milliseconds
        served, = triton(one_call_server, {"op": "infer", "ids": [[0, 1]]})
        if "error" not in served or time.monotonic() > deadline:
            break
    assert "error" not in served, served
    assert _calls_total(one_call_server, "ModelInfer", "RESOURCE_EXHAUSTED") >= 1
    assert _calls_total(one_call_server, "ModelInfer", "OK") >= 1
    assert _calls_total(one_call_server, "ServerLive", "OK") >= 1
