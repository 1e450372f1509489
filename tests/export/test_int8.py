"""`python -m export RUN --quantize int8`: the float file's contract, int8 MatMuls (in the Scan bodies too),
the next-character distribution within the stated tolerance of PyTorch on a text, and the checks that refuse
a bad file, or a model int8 cannot hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_TEXT
from support import run_stage

from export.check import verify
from export.contract import violations
from export.int8 import (
    KL_TOLERANCE,
    QUANTIZATION,
    contract_differences,
    float_matmuls,
    max_kl,
    quantize,
    subgraphs,
    verify_int8,
)
from export.scan_graph import scan_graph
from export.to_onnx import rebuild
from train import checkpoint

CELLS = ("rnn", "gru", "lstm")


@pytest.fixture(scope="module")
def int8_files(text_runs, tmp_path_factory) -> dict[str, Path]:
    """Each cell's run exported with --quantize int8 (to a folder of its own: the session's runs stay as
    the other tests expect them)."""
    folder = tmp_path_factory.mktemp("int8")
    files = {}
    for cell in CELLS:
        files[cell] = folder / f"{cell}.int8.onnx"
        proc = run_stage("export", str(text_runs[cell]), "--quantize", "int8", "--out", str(files[cell]))
        assert "int8 vs PyTorch, batch 5 seq 9" in proc.stdout and "no MatMul left in float" in proc.stdout
    return files


@pytest.mark.parametrize("cell", CELLS)
def test_the_int8_file_keeps_the_float_files_contract(text_runs, int8_files, cell):
    proto = onnx.load(str(int8_files[cell]))
    reference = onnx.load(str(text_runs[cell] / "model.onnx"))
    assert violations(proto) == []
    assert contract_differences(proto, reference) == []  # same names, dtypes, shapes and metadata
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(meta) - {p.key for p in reference.metadata_props} == {QUANTIZATION}
    assert meta[QUANTIZATION].startswith("int8 dynamic")
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("cell", CELLS)
def test_every_matmul_runs_on_int8_weights(text_runs, int8_files, cell):
    """Layer 0's recurrent product, layer 1's input and recurrent products and the head: 4 int8 weights,
    one copy each, used by both branches of the If on seq == 1 and inside the Scan bodies of the
    sequence branch, none of which holds a float MatMul."""
    proto = onnx.load(str(int8_files[cell]))
    assert float_matmuls(proto.graph) == []  # in every graph, however deep
    step, sequence = _branches(proto)
    assert [n.op_type for n in step.node].count("MatMulInteger") == 4 and "Scan" not in {n.op_type for n in step.node}
    bodies = subgraphs(sequence)
    assert len(bodies) == 2 and all("MatMulInteger" in {n.op_type for n in body.node} for body in bodies)
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert sorted(t.name for t in weights) == sorted(
        f"{w}_quantized" for w in ("layers.0.w_hh_t", "layers.1.w_ih_t", "layers.1.w_hh_t", "head.w_t"))
    # and the float graph it came from had them as MatMuls: 4 in the step, 2 + 2 in the Scan bodies
    float_graph = scan_graph(rebuild(checkpoint.load(text_runs[cell])), {})
    step, sequence = _branches(float_graph)
    assert len(float_matmuls(step)) == 4 and len(float_matmuls(sequence)) == 4
    assert sum(len(float_matmuls(body)) for body in subgraphs(sequence)) == 2


def _branches(proto):
    """The top If's (then: seq is 1, else: any seq) branches."""
    (node,) = [n for n in proto.graph.node if n.op_type == "If"]
    graphs = {a.name: a.g for a in node.attribute}
    return graphs["then_branch"], graphs["else_branch"]


@pytest.mark.parametrize("cell", CELLS)
def test_the_distribution_on_a_text_is_within_the_tolerance(text_runs, int8_files, cell):
    """The tiny corpus from the zero state, whole and one character at a time (as a server steps):
    the int8 file's next-character distribution stays within KL_TOLERANCE of PyTorch's."""
    model = rebuild(checkpoint.load(text_runs[cell]))
    vocab = checkpoint.load(text_runs[cell])["vocab"]
    ids = np.array([[vocab.index(c) for c in TINY_TEXT[:200]]], dtype=np.int64)
    sess = ort.InferenceSession(str(int8_files[cell]), providers=["CPUExecutionProvider"])
    zero = np.zeros((1, 2, model.config.state_size), dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(zero))[0].numpy()
    whole = sess.run(["logits"], {"input_ids": ids, "state_in": zero})[0]
    state, stepped = zero, []
    for t in range(ids.shape[1]):
        logits, state = sess.run(["logits", "state_out"], {"input_ids": ids[:, t : t + 1], "state_in": state})
        stepped.append(logits)
    for got in (whole, np.concatenate(stepped, axis=1)):
        assert max_kl(want, got) <= KL_TOLERANCE
        assert np.abs(got - want).max() > 1e-5  # int8, not a float graph (1e-7 off): the bound above means something


@pytest.mark.parametrize("cell", CELLS)
def test_the_float_scan_graph_matches_pytorch_like_any_export(text_runs, cell):
    """Before quantization the Scan/MatMul graph is the model within export's float tolerance."""
    model = rebuild(checkpoint.load(text_runs[cell]))
    reference = onnx.load(str(text_runs[cell] / "model.onnx"))
    report = verify(scan_graph(model, {p.key: p.value for p in reference.metadata_props}), model)
    assert report.ok, report.problems


def test_the_cli_writes_model_int8_onnx_beside_the_checkpoint(text_runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(text_runs["gru"] / checkpoint.FILENAME, run)
    proc = run_stage("export", str(run), "--quantize", "int8")
    assert (run / "model.int8.onnx").is_file() and not (run / "model.onnx").exists()
    assert f"wrote {run / 'model.int8.onnx'}" in proc.stdout
    assert "before quantization" in proc.stdout and "Traceback" not in proc.stderr
    before = (run / "model.int8.onnx").read_bytes()
    run_stage("export", str(run), "--quantize", "int8")
    assert (run / "model.int8.onnx").read_bytes() == before, "the same checkpoint quantizes to the same bytes"


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int8", "--repository", "REPO"], "does not combine with --repository or --triton-repo"),
    (["--quantize", "int8", "--triton-repo", "REPO"], "does not combine with --repository or --triton-repo"),
    (["--quantize", "int4"], "invalid choice: 'int4'"),
])
def test_the_cli_refuses_what_it_cannot_do(text_runs, tmp_path, flags, message):
    flags = [str(tmp_path / "repo") if f == "REPO" else f for f in flags]
    proc = run_stage("export", str(text_runs["gru"]), *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "repo").exists() and not (text_runs["gru"] / "model.int8.onnx").exists()


def test_verify_int8_fails_a_wrongly_scaled_weight_and_a_nan(text_runs):
    model = rebuild(checkpoint.load(text_runs["gru"]))
    reference = onnx.load(str(text_runs["gru"] / "model.onnx"))
    good = quantize(scan_graph(model, {p.key: p.value for p in reference.metadata_props}))
    assert verify_int8(good, model, reference).ok

    scaled = onnx.ModelProto()
    scaled.CopyFrom(good)
    scale = next(t for t in scaled.graph.initializer if t.name == "head.w_t_scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 3, scale.name))
    report = verify_int8(scaled, model, reference)
    assert not report.ok and any("max KL" in p for p in report.problems), report.problems

    poisoned = onnx.ModelProto()
    poisoned.CopyFrom(good)
    bias = next(t for t in poisoned.graph.initializer if t.name == "head.bias")
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full_like(onnx.numpy_helper.to_array(bias), np.nan), bias.name))
    report = verify_int8(poisoned, model, reference)
    assert any("outputs are not finite" in p for p in report.problems)
    assert any("max KL nan" in p for p in report.problems)  # NaN fails the tolerance, not passes it


def test_verify_int8_fails_a_contract_that_departs_from_the_float_file(text_runs):
    model = rebuild(checkpoint.load(text_runs["gru"]))
    reference = onnx.load(str(text_runs["gru"] / "model.onnx"))
    meta = {p.key: p.value for p in reference.metadata_props}
    proto = quantize(scan_graph(model, {k: v for k, v in meta.items() if k != "val_loss"}))
    assert any("metadata differs from the float file's" in p for p in verify_int8(proto, model, reference).problems)


def test_a_model_int8_cannot_hold_is_refused(hihell_run, tmp_path):
    """The seed lesson's RNN of 5 units, saturated: on random characters its int8 state departs by more than
    the tolerance, so export says so and writes nothing (on its own text it would still say ihello)."""
    out = tmp_path / "hihell.int8.onnx"
    proc = run_stage("export", str(hihell_run), "--quantize", "int8", "--out", str(out), check=False)
    assert proc.returncode == 1 and "FAIL: batch" in proc.stdout and "limits 0.02, 0.05" in proc.stdout
    assert f"int8 FAILED, {out} not written" in proc.stderr and not out.exists()
