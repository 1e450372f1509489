"""The contract check at load: hand-built ONNX files that break it in one way each."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from serve.errors import DeviceError, ModelError
from serve.engine.runtime import Runtime

VOCAB = ["a", "b", "c"]
META = {"vocab": json.dumps(VOCAB), "cell": "gru", "num_layers": "2", "hidden_size": "4", "state_size": "4",
        "corpus": "unit", "producer": "charrnn"}


def bigram_model(path, meta=META, ids_name="input_ids", ids_type=TensorProto.INT64, vocab_rows=3,
                 state_dims=("batch", 2, 4)):
    """A stateless conforming graph: logits = table[input_ids], state_out = state_in."""
    table = numpy_helper.from_array(np.arange(vocab_rows * len(VOCAB), dtype=np.float32)
                                    .reshape(vocab_rows, len(VOCAB)), "table")
    nodes = [helper.make_node("Gather", ["table", ids_name], ["logits"], axis=0),
             helper.make_node("Identity", ["state_in"], ["state_out"])]
    if ids_type != TensorProto.INT64:
        nodes[0] = helper.make_node("Gather", ["table", "ids64"], ["logits"], axis=0)
        nodes.insert(0, helper.make_node("Cast", [ids_name], ["ids64"], to=TensorProto.INT64))
    graph = helper.make_graph(
        nodes, "bigram",
        [helper.make_tensor_value_info(ids_name, ids_type, ["batch", "seq"]),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, list(state_dims))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab_rows and None]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, list(state_dims))],
        initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, path)
    return path


def test_a_conforming_file_loads(tmp_path):
    rt = Runtime(bigram_model(tmp_path / "m.onnx"), "cpu")
    assert rt.spec.vocab == tuple(VOCAB) and rt.spec.state_shape == (2, 4)
    assert rt.spec.provenance == {"corpus": "unit", "producer": "charrnn"}
    assert rt.provider == "CPUExecutionProvider" and len(rt.spec.sha256) == 64


def test_the_real_model_loads(hihell_model):
    rt = Runtime(hihell_model, "cpu")
    logits, state = rt.run(np.array([[0, 1]], dtype=np.int64), rt.zero_state(1))
    assert logits.shape == (1, 2, 5) and state.shape == (1, 1, 5)


@pytest.mark.parametrize("change, problem", [
    (dict(meta={k: v for k, v in META.items() if k != "vocab"}), "missing metadata vocab"),
    (dict(meta={k: v for k, v in META.items() if k not in ("cell", "state_size")}), "cell, state_size"),
    (dict(meta={**META, "vocab": "abc"}), "not JSON"),
    (dict(meta={**META, "vocab": '{"a": 1}'}), "JSON list"),
    (dict(meta={**META, "vocab": '["a", "bb", "c"]'}), "single-character"),
    (dict(meta={**META, "vocab": '["a", "a", "c"]'}), "repeated"),
    (dict(meta={**META, "cell": "transformer"}), "cell"),
    (dict(meta={**META, "num_layers": "two"}), "num_layers"),
    (dict(meta={**META, "num_layers": "\u00b2"}), "positive decimal integer, got '\u00b2'"),  # isdigit(), not int()
    (dict(meta={**META, "num_layers": "\u0662"}), "positive decimal integer"),  # int() reads it as 2
    (dict(meta={**META, "num_layers": "0"}), "positive decimal integer"),
    (dict(meta={**META, "hidden_size": " 4"}), "hidden_size"),
    (dict(meta={**META, "state_size": "8"}), "state_size 8"),
    (dict(ids_name="tokens"), "inputs are"),
    (dict(ids_type=TensorProto.INT32), "tensor(int32)"),
    (dict(state_dims=("batch", 3, 4)), "dimension 1 is 3"),
    (dict(vocab_rows=5), "logits"),
])
def test_contract_violations_name_the_file_and_problem(tmp_path, change, problem):
    path = tmp_path / "bad.onnx"
    if change.get("vocab_rows"):  # a 5-row table under 3-character metadata
        bigram_model(path, vocab_rows=5)
        model = onnx.load(path)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((5, 5), np.float32), "table"))
        onnx.save(model, path)
    else:
        bigram_model(path, **change)
    with pytest.raises(ModelError) as caught:
        Runtime(path, "cpu")
    assert str(path) in str(caught.value) and problem in str(caught.value)


@pytest.mark.parametrize("row, value, problem", [
    (2, np.nan, "2 of 18 logits values"),  # only character 'c' is damaged: every character is tried
    (0, -np.inf, "2 of 18 logits values"),
])
def test_non_finite_logits_are_refused(tmp_path, row, value, problem):
    path = bigram_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    table = numpy_helper.to_array(model.graph.initializer[0]).copy()
    table[row, 0] = value
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(table, "table"))
    onnx.save(model, path)
    with pytest.raises(ModelError) as caught:
        Runtime(path, "cpu")
    assert str(path) in str(caught.value) and f"non-finite outputs (NaN or infinity): {problem};" in str(caught.value)


def test_a_non_finite_state_is_refused_though_the_logits_are_finite(tmp_path):
    path = bigram_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.inf, np.float32), "inf"))
    state_node = next(n for n in model.graph.node if n.op_type == "Identity")
    state_node.CopyFrom(helper.make_node("Mul", ["state_in", "inf"], ["state_out"]))  # 0 * inf = NaN
    onnx.save(model, path)
    with pytest.raises(ModelError, match=r"non-finite outputs \(NaN or infinity\): 16 of 16 state_out values;"):
        Runtime(path, "cpu")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelError, match="cannot read"):
        Runtime(tmp_path / "nope.onnx", "cpu")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelError, match="junk.onnx: not a loadable ONNX model"):
        Runtime(tmp_path / "junk.onnx", "cpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available")
def test_cuda_without_cuda_fails_clearly(tmp_path):
    with pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        Runtime(bigram_model(tmp_path / "m.onnx"), "cuda")
    assert Runtime(tmp_path / "m.onnx", "auto").provider == "CPUExecutionProvider"
