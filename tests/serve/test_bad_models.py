"""`python -m serve` on broken model files: exit non-zero, naming the file and what is wrong.

(Missing file, corrupt bytes and stripped metadata are in test_cli.py; the contract's finer points are
unit-tested in test_runtime.py.)
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from support import run_stage


def renamed_input(model: onnx.ModelProto) -> None:
    old = model.graph.input[0].name
    model.graph.input[0].name = "tokens"
    for node in model.graph.node:
        node.input[:] = ["tokens" if name == old else name for name in node.input]


def set_meta(key: str, value: str):
    def change(model: onnx.ModelProto) -> None:
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value
    return change


def drop_meta(key: str):
    def change(model: onnx.ModelProto) -> None:
        kept = [p for p in model.metadata_props if p.key != key]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    return change


@pytest.mark.parametrize("change, problem", [
    (renamed_input, "inputs are ['state_in', 'tokens'], expected ['input_ids', 'state_in']"),
    (drop_meta("state_size"), "missing metadata state_size"),
    (set_meta("vocab", '{"h": 0, "i": 1}'), "metadata 'vocab' must be a non-empty JSON list"),
    (set_meta("vocab", "h,i,e,l,o"), "metadata 'vocab' is not JSON"),
    (set_meta("num_layers", "two"), "metadata 'num_layers' must be a positive decimal integer"),
    (set_meta("num_layers", "\u00b2"), "metadata 'num_layers' must be a positive decimal integer"),
])
def test_server_refuses_a_broken_model(tmp_path, hihell_model, change, problem):
    path, stderr = refusal_of(tmp_path / "broken.onnx", hihell_model, change)
    assert f"{path}: " in stderr and problem in stderr, stderr


def refusal_of(path: Path, model_file: Path, change) -> tuple[Path, str]:
    """Saves the model changed by `change` at PATH and starts the server on it: it must refuse at start
    (exit 2, nothing on stdout, no traceback). Returns (path, stderr)."""
    model = onnx.load(model_file)
    change(model)
    onnx.save(model, path)
    proc = run_stage("serve", "--model", str(path), check=False, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr
    return path, proc.stderr


def test_server_refuses_truncated_onnx(tmp_path, hihell_model):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(hihell_model.read_bytes()[:200])
    proc = run_stage("serve", "--model", str(path), check=False, timeout=60)
    assert proc.returncode == 2 and f"{path}: not a loadable ONNX model" in proc.stderr


RNN_BIAS = ""  # the RNN operator's B input: its initializer's name is numbered by the exporter


def poisoned(name: str, value: float):
    """Sets one element of the initializer `name` (a weight of the real exported graph) to `value`."""
    def change(model: onnx.ModelProto) -> None:
        nonlocal name
        if name == RNN_BIAS:
            name = next(n.input[3] for n in model.graph.node if n.op_type == "RNN")
        for tensor in model.graph.initializer:
            if tensor.name == name:
                array = onnx.numpy_helper.to_array(tensor).copy()
                array.flat[0] = value
                tensor.CopyFrom(onnx.numpy_helper.from_array(array, name))
                return
        raise AssertionError(f"no initializer {name!r}: the exporter's names changed")
    return change


@pytest.mark.parametrize("change, problem", [
    (poisoned("head.bias", float("nan")), "non-finite outputs (NaN or infinity): 10 of 50 logits values;"),
    (poisoned("head.bias", float("inf")), "non-finite outputs (NaN or infinity): 10 of 50 logits values;"),
    # the recurrent bias: the state goes NaN, and the logits computed from it with it
    (poisoned(RNN_BIAS, float("nan")), "50 of 50 logits values and 10 of 10 state_out values"),
])
def test_server_refuses_a_model_whose_outputs_are_not_finite(tmp_path, hihell_model, change, problem):
    """A diverged or damaged model would sample token 0 forever with a NaN logprob: refused at start."""
    path, stderr = refusal_of(tmp_path / "nan.onnx", hihell_model, change)
    assert f"{path}: test run gave " in stderr and problem in stderr, stderr
