"""The hidden state over the wire (issue 20): HTTP POST /v1/trace and GET /v1/model, gRPC Predict with
`hidden`, the playground's static files; a model file exported before `hidden` existed still serves.

Every hidden value is checked against onnxruntime run on the file directly (tests/kserve_reference.py).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kserve_reference import Reference
from live import LiveServer, post, serve_model
from support import strip_hidden

from serve.api.http.charrnn import trace_request
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.errors import InvalidArgument
from serve.service.charrnn import MAX_ALTERNATIVES, MAX_TRACE_CHARS


def get(server: LiveServer, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return post(server, path, b"", headers=headers, method="GET")


def trace(server: LiveServer, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, _, raw = post(server, "/v1/trace", body, headers=headers)
    return status, json.loads(raw)


def floats(encoded: dict) -> np.ndarray:
    assert encoded["dtype"] == "float32" and encoded["byteorder"] == "little"
    return np.frombuffer(base64.b64decode(encoded["data"]), dtype="<f4").reshape(encoded["shape"])


@pytest.fixture(scope="module")
def hihell(hihell_model: Path) -> Reference:
    return Reference(hihell_model)


@pytest.fixture(scope="module")
def old_server(hihell_model: Path, tmp_path_factory) -> Iterator[LiveServer]:
    yield from serve_model(strip_hidden(hihell_model, tmp_path_factory.mktemp("old") / "model.onnx"))


def test_trace_of_the_seed_lesson(hihell_server, hihell):
    status, body = trace(hihell_server, {"text": "hihell", "top_k": 3})
    assert status == 200, body
    assert "".join(c["next"] for c in body["chars"]) == "ihello"
    assert [c["input"] for c in body["chars"]] == list("hihell")
    for c in body["chars"]:
        assert len(c["top"]) == 3 and c["top"][0]["text"] == c["next"]
        assert abs(c["top"][0]["probability"] - c["probability"]) <= 1e-6
    hidden = floats(body["hidden"])
    want = hihell.hidden(np.array([hihell.ids("hihell")]))[0]
    assert hidden.shape == want.shape == (6, 1, 5)
    assert np.abs(hidden - want).max() <= 1e-6
    _, state_out = hihell.run(np.array([hihell.ids("hihell")]))
    assert np.abs(hidden[-1] - state_out[0][:, :5]).max() <= 1e-6  # the last h is the state passed on


def test_trace_of_an_lstm_holds_h_not_c(lstm_server, text_runs):
    reference = Reference(text_runs["lstm"] / "model.onnx")
    text = "it was the age of wisdom"
    status, body = trace(lstm_server, {"text": text})
    assert status == 200, body
    hidden = floats(body["hidden"])
    layers, state = reference.state_shape
    assert hidden.shape == (len(text), layers, state // 2)
    assert np.abs(hidden - reference.hidden(np.array([reference.ids(text)]))[0]).max() <= 1e-5


def test_grpc_predict_returns_hidden_when_asked(hihell_server, hihell):
    def predict(*requests):
        return list(hihell_server.stub.Predict(iter(requests), timeout=30))

    whole = predict(pb.PredictRequest(text="hihell", top_k=2, hidden=True))
    split = predict(pb.PredictRequest(text="hih", hidden=True), pb.PredictRequest(text="ell", hidden=True))
    plain = predict(pb.PredictRequest(text="hihell"))
    want = hihell.hidden(np.array([hihell.ids("hihell")]))[0].reshape(6, -1)
    assert "".join(r.next for r in whole) == "".join(r.next for r in split) == "ihello"
    for responses in (whole, split):
        got = np.array([list(r.hidden) for r in responses], dtype=np.float32)
        assert got.shape == (6, 5) and np.abs(got - want).max() <= 1e-6
    assert all(len(r.hidden) == 0 for r in plain)


def test_model_route_has_get_model_info_facts(hihell_server):
    status, _, raw = get(hihell_server, "/v1/model")
    body = json.loads(raw)
    info = hihell_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert status == 200
    assert body["vocab"] == list(info.vocab) and body["cell"] == info.cell == "rnn"
    for field in ("num_layers", "hidden_size", "state_size", "model_sha256", "val_loss", "project_version",
                  "execution_provider", "corpus", "steps", "max_chars"):
        assert body[field] == getattr(info, field), field
    assert body["hidden"] is True and body["max_trace_chars"] == MAX_TRACE_CHARS


@pytest.mark.parametrize("body, param, words", [
    ({}, "text", "text is required"),
    ({"text": ""}, "text", "text is required"),
    ({"text": 5}, "text", "text is required"),
    ({"text": "h" * (MAX_TRACE_CHARS + 1)}, "text", f"the limit for a trace is {MAX_TRACE_CHARS}"),
    ({"text": "hi", "top_k": 21}, "top_k", "between 0 and 20"),
    ({"text": "hi", "top_k": True}, "top_k", "between 0 and 20"),
    ({"text": "hi", "colour": 1}, "colour", "unknown field 'colour'"),
    ({"text": "hix!"}, None, "outside the model's vocabulary: 'x', '!'"),
])
def test_bad_traces_are_400_in_words(hihell_server, body, param, words):
    status, answer = trace(hihell_server, body)
    assert status == 400 and words in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param


def test_bad_json_and_wrong_model(hihell_server):
    status, _, raw = post(hihell_server, "/v1/trace", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    status, body = trace(hihell_server, {"text": "hi", "model": "gpt-4"})
    assert status == 404 and body["error"]["param"] == "model"


def test_a_model_without_hidden_still_serves_and_says_to_export_again(old_server, hihell):
    assert "hidden" not in [o.name for o in onnx.load(str(old_server.settings.model)).graph.output]
    responses = list(old_server.stub.Predict(iter([pb.PredictRequest(text="hihell")]), timeout=30))
    assert "".join(r.next for r in responses) == "ihello"
    status, body = trace(old_server, {"text": "hihell"})
    assert status == 400 and "export it again" in body["error"]["message"], body
    with pytest.raises(grpc.RpcError) as caught:
        list(old_server.stub.Predict(iter([pb.PredictRequest(text="hi", hidden=True)]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "export it again" in caught.value.details()
    status, _, raw = get(old_server, "/v1/model")
    assert status == 200 and json.loads(raw)["hidden"] is False
    status, _, raw = get(old_server, "/v2/models/charrnn")
    assert [o["name"] for o in json.loads(raw)["outputs"]] == ["logits", "state_out"]


def test_the_page_is_served_open_and_from_this_origin_only(hihell_model):
    for server in serve_model(hihell_model, auth_token="s3cret"):
        status, headers, raw = get(server, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b'data-testid="generate"' in raw
        assert "default-src 'self'" in headers["content-security-policy"]
        for path, kind in (("/static/app.js", "javascript"), ("/static/api.js", "javascript"),
                           ("/static/style.css", "text/css")):
            status, headers, _ = get(server, path)
            assert status == 200 and kind in headers["content-type"], path
        status, _, _ = get(server, "/static/nope.js")
        assert status == 404
        status, _, raw = get(server, "/v1/model")  # the API behind the page still needs the token
        assert status == 401
        status, _, raw = get(server, "/v1/model", headers={"authorization": "Bearer s3cret"})
        assert status == 200


def test_both_engines_trace_alike_beside_plain_predicts(hihell_model, hihell):
    """The thread engine (the fixtures above run the default, an engine process): traces and plain
    Predicts arriving together batch apart (only the traces' calls fetch hidden) and both come back right."""
    want = hihell.hidden(np.array([hihell.ids("hihell")]))[0]
    for server in serve_model(hihell_model, engine="thread"):
        def one(k: int, server: LiveServer = server) -> list[pb.PredictResponse]:
            return list(server.stub.Predict(iter([pb.PredictRequest(text="hihell", hidden=k % 2 == 0)]), timeout=30))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(16)))
        for k, responses in enumerate(results):
            assert "".join(r.next for r in responses) == "ihello"
            got = np.array([list(r.hidden) for r in responses], dtype=np.float32)
            if k % 2 == 0:
                assert np.abs(got.reshape(want.shape) - want).max() <= 1e-6
            else:
                assert got.size == 0
        status, body = trace(server, {"text": "hihell"})
        assert status == 200 and np.abs(floats(body["hidden"]) - want).max() <= 1e-6


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["text", "top_k", "model", "extra"]), JSON, max_size=4)
       | st.fixed_dictionaries({"text": st.text(min_size=1, max_size=30)},
                               optional={"top_k": st.integers(-3, 30), "model": st.text(max_size=5)}))
def test_any_trace_body_is_accepted_exactly_when_valid(body):
    top_k = body.get("top_k", 5)
    valid = (set(body) <= {"text", "top_k", "model"} and isinstance(body.get("text"), str)
             and 0 < len(body["text"]) <= MAX_TRACE_CHARS
             and isinstance(top_k, int) and not isinstance(top_k, bool) and 0 <= top_k <= MAX_ALTERNATIVES
             and (body.get("model") is None or isinstance(body["model"], str)))
    try:
        request = trace_request(body)
    except InvalidArgument as error:
        assert not valid and error.param in ("text", "top_k", "model", "extra"), error
    else:
        assert valid and request.text == body["text"] and request.top_k == top_k
