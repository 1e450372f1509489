"""An int8 export (`python -m export RUN --quantize int8`) served unchanged: a real server on 127.0.0.1
port 0 loads model.int8.onnx like any model file and answers on gRPC and HTTP, batched streams included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
from live import LiveServer, post, serve_model
from support import run_stage

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb


def _int8(run: Path, out: Path) -> Path:
    run_stage("export", str(run), "--quantize", "int8", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def text_int8_server(text_runs, tmp_path_factory) -> Iterator[LiveServer]:
    yield from serve_model(_int8(text_runs["gru"], tmp_path_factory.mktemp("int8") / "gru.int8.onnx"),
                           max_chars=1000)


def _generate(server: LiveServer, **fields: object) -> str:
    return "".join(r.text for r in server.stub.Generate(pb.GenerateRequest(**fields), timeout=30))


def test_the_int8_model_generates_on_grpc_and_http_with_batched_streams(text_int8_server, text_runs):
    meta = {p.key: p.value for p in onnx.load(str(text_runs["gru"] / "model.onnx")).metadata_props}
    vocab = set(json.loads(meta["vocab"]))
    with ThreadPoolExecutor(8) as pool:  # 8 streams at once: the engine steps them as one batch
        texts = list(pool.map(lambda seed: _generate(text_int8_server, prompt="it was", max_chars=60, seed=seed),
                              range(8)))
    assert all(len(t) == 60 and set(t) <= vocab for t in texts) and len(set(texts)) > 1
    assert _generate(text_int8_server, prompt="it was", max_chars=60, seed=3, temperature=0.8) == \
        _generate(text_int8_server, prompt="it was", max_chars=60, seed=3, temperature=0.8)
    status, _, body = post(text_int8_server, "/v1/completions",
                           {"model": "charrnn", "prompt": "it was", "max_tokens": 30, "seed": 1})
    assert status == 200 and len(json.loads(body)["choices"][0]["text"]) == 30
