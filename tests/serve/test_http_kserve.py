"""KServe v2 REST through a real server: tritonclient.http (in .venv-triton) and raw HTTP, against
onnxruntime on the model file and against the gRPC binding, whose sequences it shares."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from google.protobuf import json_format
from kserve_reference import _argmax, _array, random_inputs
from live import LiveServer, post
from tritonenv import run_tritonside

from serve.api.pb.inference import grpc_service_pb2 as pb
from serve.api.pb.inference import grpc_service_pb2_grpc as pb_grpc

MODEL = "charrnn"


def triton_http(server: LiveServer, *calls: dict) -> list[dict]:
    return run_tritonside("kserve_http.py", server.http_url.removeprefix("http://"), stdin=list(calls))


def test_tritonclient_http_probes_and_metadata_match_grpc(hihell_server):
    live, ready, model_ready, server, model, config, unknown = triton_http(
        hihell_server, {"op": "live"}, {"op": "ready"}, {"op": "model_ready"}, {"op": "server_metadata"},
        {"op": "model_metadata"}, {"op": "model_config"}, {"op": "model_metadata", "model": "nope"})
    assert live == {"live": True} and ready == {"ready": True} and model_ready == {"ready": True}
    assert server["name"] == "charrnn" and "binary_tensor_data" in server["extensions"]
    stub = pb_grpc.GRPCInferenceServiceStub(hihell_server.channel)
    over_grpc = json_format.MessageToDict(stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL)),
                                          preserving_proto_field_name=True)
    for tensor in (*over_grpc["inputs"], *over_grpc["outputs"]):
        tensor["shape"] = [int(d) for d in tensor["shape"]]
    assert model == over_grpc
    grpc_config = json_format.MessageToDict(stub.ModelConfig(pb.ModelConfigRequest(name=MODEL)).config,
                                            preserving_proto_field_name=True)
    assert config == grpc_config
    assert unknown["error"]["status"] == "404" and "unknown model 'nope'" in unknown["error"]["message"]


def test_explicit_state_matches_onnxruntime_binary_and_json(text_server, text):
    ids, state, batch_ids, batch_state = random_inputs(text)
    one = {"ids": ids.tolist(), "state": state.tolist()}
    binary, as_json, batched, concurrent = triton_http(
        text_server, {"op": "infer", **one}, {"op": "infer", **one, "binary": False},
        {"op": "infer", "ids": batch_ids.tolist(), "state": batch_state.tolist()},
        {"op": "concurrent", "calls": [{"ids": batch_ids[i:i + 1].tolist(), "state": batch_state[i:i + 1].tolist()}
                                       for i in range(4)]})
    assert binary["outputs"]["logits"]["binary"] and not as_json["outputs"]["logits"]["binary"]
    logits, state_out = text.run(ids, state)
    for result in (binary, as_json):
        assert np.abs(_array(result["outputs"]["logits"]) - logits).max() <= 1e-6
        assert np.abs(_array(result["outputs"]["state_out"]) - state_out).max() <= 1e-6
    logits, state_out = text.run(batch_ids, batch_state)
    assert np.abs(_array(batched["outputs"]["logits"]) - logits).max() <= 1e-5
    for i, result in enumerate(concurrent):
        assert np.abs(_array(result["outputs"]["logits"]) - logits[i:i + 1]).max() <= 1e-5


def test_a_sequence_started_over_rest_continues_over_grpc(hihell_server, hihell):
    """Both bindings share the server's sequences: hihell -> ihello, half on each."""
    rest = triton_http(hihell_server, *({"op": "infer", "ids": [hihell.ids(c)], "sequence_id": 77, "start": i == 0}
                                        for i, c in enumerate("hih")))
    stub = pb_grpc.GRPCInferenceServiceStub(hihell_server.channel)
    rest_text = "".join(_argmax(r, hihell.vocab) for r in rest)
    grpc_text = ""
    for i, c in enumerate("ell"):
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 1]).contents.int64_contents.append(
            hihell.ids(c)[0])
        request.parameters["sequence_id"].int64_param = 77
        request.parameters["sequence_end"].bool_param = i == 2
        response = stub.ModelInfer(request)
        logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32) if response.raw_output_contents \
            else np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32)
        grpc_text += hihell.vocab[int(logits.argmax())]
    assert rest_text + grpc_text == "ihello"


def _binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {"inference-header-content-length": str(len(text)),
                                    "content-type": "application/octet-stream"}


def test_raw_binary_request_and_binary_response(hihell_server, hihell):
    ids = np.array([hihell.ids("hihell")], dtype=np.int64)
    body, headers = _binary_body({"inputs": [{"name": "input_ids", "shape": [1, 6], "datatype": "INT64",
                                              "parameters": {"binary_data_size": ids.nbytes}}],
                                  "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                              {"name": "state_out"}], "id": "r1"}, ids.tobytes())
    status, got_headers, raw = post(hihell_server, f"/v2/models/{MODEL}/versions/1/infer", body, headers)
    assert status == 200 and got_headers["content-type"] == "application/octet-stream"
    length = int(got_headers["inference-header-content-length"])
    header = json.loads(raw[:length])
    assert header["id"] == "r1" and header["model_version"] == "1"
    logits_meta, state_meta = header["outputs"]
    size = logits_meta["parameters"]["binary_data_size"]
    logits = np.frombuffer(raw[length:length + size], dtype="<f4").reshape(logits_meta["shape"])
    expected_logits, expected_state = hihell.run(ids)
    assert np.abs(logits - expected_logits).max() <= 1e-6 and len(raw) == length + size
    assert np.abs(np.array(state_meta["data"], dtype=np.float32).reshape(state_meta["shape"])
                  - expected_state).max() <= 1e-6
    assert "".join(hihell.vocab[i] for i in logits[0].argmax(-1)) == "ihello"


BAD = [
    ({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [0, 1.5]}]}, 400,
     "not INT64"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 1]}]}, 400,
     "holds 2 values, shape [1, 3] needs 3"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT32", "data": [0]}]}, 400,
     "datatype INT32, the model takes INT64"),
    ({"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [0]}]}, 400, "no such input"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [99]}]}, 400,
     "outside the vocabulary"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "STRING", "data": [0]}]}, 400,
     "not one this server reads"),
    ({"inputs": [{"name": "input_ids", "shape": [-1], "datatype": "INT64", "data": [0]}]}, 400,
     "not a tensor shape"),
    ({"inputs": []}, 400, "non-empty list"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [0]}],
      "outputs": [{"name": "attention"}]}, 400, "no such output"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [0]}],
      "parameters": {"sequence_id": 5}}, 400, "sequence_start"),
    ({"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "INT64",
                  "parameters": {"binary_data_size": 8}}]}, 400, "binary data"),
]


@pytest.mark.parametrize("body, status, fragment", BAD)
def test_bad_tensors_get_400_naming_what_is_wrong(hihell_server, body, status, fragment):
    got, _, raw = post(hihell_server, f"/v2/models/{MODEL}/infer", body)
    assert got == status and fragment in json.loads(raw)["error"], raw


def test_unknown_models_versions_and_routes(hihell_server):
    assert post(hihell_server, "/v2/models/nope/infer", {"inputs": []})[0] == 404
    assert post(hihell_server, f"/v2/models/{MODEL}/versions/2", b"", method="GET")[0] == 404
    status, _, raw = post(hihell_server, "/v2/nothing", b"", method="GET")
    assert status == 404 and "no route" in json.loads(raw)["error"]
    assert post(hihell_server, f"/v2/models/{MODEL}/infer", b"", method="GET")[0] == 405


def test_a_short_binary_body_is_refused(hihell_server):
    body, headers = _binary_body({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64",
                                              "parameters": {"binary_data_size": 16}}]}, struct.pack("<q", 1))
    status, _, raw = post(hihell_server, f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 400 and "holds 8 bytes" in json.loads(raw)["error"]




def test_hidden_is_returned_when_asked_for_by_name(hihell_server, hihell):
    """The REST binding's requested output `hidden` (JSON and binary): the file's own values; unasked, absent."""
    ids = np.array([hihell.ids("hihell")], dtype=np.int64)
    want = hihell.hidden(ids)
    for binary in (False, True):
        status, headers, raw = post(hihell_server, f"/v2/models/{MODEL}/infer", {
            "inputs": [{"name": "input_ids", "shape": [1, 6], "datatype": "INT64", "data": ids.ravel().tolist()}],
            "outputs": [{"name": "hidden", "parameters": {"binary_data": binary}}]})
        assert status == 200, raw
        if binary:
            head = int(headers["inference-header-content-length"])
            (out,) = json.loads(raw[:head])["outputs"]
            assert out["name"] == "hidden" and out["parameters"]["binary_data_size"] == want.nbytes
            got = np.frombuffer(raw[head:], dtype="<f4").reshape(want.shape)
        else:
            (out,) = json.loads(raw)["outputs"]
            assert out["name"] == "hidden" and out["shape"] == list(want.shape) and out["datatype"] == "FP32"
            got = np.array(out["data"], dtype=np.float32).reshape(want.shape)
        assert np.abs(got - want).max() <= 1e-6
    status, _, raw = post(hihell_server, f"/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "input_ids", "shape": [1, 6], "datatype": "INT64", "data": ids.ravel().tolist()}]})
    assert status == 200 and [o["name"] for o in json.loads(raw)["outputs"]] == ["logits", "state_out"]
