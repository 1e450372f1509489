import dataclasses
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import run_stage

from export.check import verify
from export.contract import violations
from export.to_onnx import ExportError, rebuild, to_onnx
from train import checkpoint

CELLS = ("rnn", "gru", "lstm")


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("cell", CELLS)
def test_contract_in_the_written_file(text_runs, cell):
    path = text_runs[cell] / "model.onnx"
    assert not list(text_runs[cell].glob("*.data")), "weights must stay inside model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert all(not t.external_data for t in model.graph.initializer)
    state = 64 if cell == "lstm" else 32
    vocab = len(json.loads({p.key: p.value for p in model.metadata_props}["vocab"]))
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    assert list(inputs) == ["input_ids", "state_in"] and list(outputs) == ["logits", "state_out", "hidden"]
    assert inputs["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    for v in (inputs["state_in"], outputs["logits"], outputs["state_out"], outputs["hidden"]):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # batch and seq are symbolic on inputs and outputs: nothing from the example input leaked in.
    assert _dims(inputs["input_ids"]) == ["batch", "seq"]
    assert _dims(inputs["state_in"]) == ["batch", 2, state]
    assert _dims(outputs["logits"]) == ["batch", "seq", vocab]
    assert _dims(outputs["state_out"]) == ["batch", 2, state]
    assert _dims(outputs["hidden"]) == ["batch", "seq", 2, 32]  # h only, for lstm too
    assert violations(model) == []


@pytest.mark.parametrize("cell", CELLS)
def test_metadata(text_runs, cell):
    model = onnx.load(str(text_runs[cell] / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    ckpt = checkpoint.load(text_runs[cell])
    assert json.loads(meta["vocab"]) == ckpt["vocab"]
    assert meta["cell"] == cell and meta["num_layers"] == "2" and meta["hidden_size"] == "32"
    assert meta["state_size"] == str(64 if cell == "lstm" else 32)
    assert meta["steps"] == "5" and meta["corpus"].endswith("tiny.txt")
    assert float(meta["val_loss"]) == pytest.approx(ckpt["summary"]["best_val_loss"], abs=1e-6)
    assert float(meta["val_loss_windowed"]) == pytest.approx(ckpt["summary"]["best_val_loss_windowed"], abs=1e-6)
    assert meta["torch_version"].startswith("2.13") and meta["exported_at"].endswith("+00:00")
    assert meta["exported_at"] == ckpt["summary"]["ended_at"], "when training saved the weights, not the clock"


def test_the_same_checkpoint_exports_the_same_bytes(text_runs, tmp_path):
    """Reproducible export: a re-export of unchanged weights changes nothing, so no server reloads."""
    run = text_runs["gru"]
    again = tmp_path / "again.onnx"
    run_stage("export", str(run), "--out", str(again))
    assert again.read_bytes() == (run / "model.onnx").read_bytes()


@pytest.mark.parametrize("cell", CELLS)
def test_runs_at_any_batch_and_length_and_matches_pytorch(text_runs, cell):
    ckpt = checkpoint.load(text_runs[cell])
    model = rebuild(ckpt)
    sess = ort.InferenceSession(str(text_runs[cell] / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = torch.Generator().manual_seed(1)
    for batch, seq in ((1, 1), (7, 3), (2, 41), (64, 1)):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=rng)
        state = torch.randn(batch, 2, model.config.state_size, generator=rng)
        logits, new_state, hidden = sess.run(None, {"input_ids": ids.numpy(), "state_in": state.numpy()})
        with torch.no_grad():
            want_logits, want_state, want_hidden = model.trace(ids, state)
        assert np.abs(logits - want_logits.numpy()).max() <= 1e-4
        assert np.abs(new_state - want_state.numpy()).max() <= 1e-4
        assert hidden.shape == (batch, seq, 2, 32) and np.abs(hidden - want_hidden.numpy()).max() <= 1e-4
        assert np.array_equal(hidden[:, -1], new_state[:, :, :32])  # the last h is the state's h (lstm: then c)


def test_exporter_keeps_the_recurrent_ops(text_runs):
    """The pinned TorchScript path emits ONNX RNN/GRU/LSTM ops (dynamo unrolls or freezes nn.RNN)."""
    for cell, op in (("rnn", "RNN"), ("gru", "GRU"), ("lstm", "LSTM")):
        model = onnx.load(str(text_runs[cell] / "model.onnx"))
        assert op in {n.op_type for n in model.graph.node}, cell


def test_export_prints_its_checks(tmp_path, tiny_corpus):
    run_stage("train", "--corpus", str(tiny_corpus), "--hidden", "8", "--layers", "1", "--steps", "2",
              "--batch-size", "2", "--seq-len", "8", "--out", str(tmp_path))
    proc = run_stage("export", str(tmp_path))
    assert proc.stdout.count("onnxruntime vs PyTorch") >= 4
    assert "one char at a time" in proc.stdout and "wrote" in proc.stdout


def test_verify_catches_a_broken_graph(text_runs):
    ckpt = checkpoint.load(text_runs["gru"])
    model = rebuild(ckpt)
    proto = to_onnx(model, ckpt["vocab"], {})
    for node in proto.graph.initializer:  # corrupt the projection bias: parity must fail
        if node.dims == [len(ckpt["vocab"])]:
            arr = onnx.numpy_helper.to_array(node).copy() + 1.0
            node.CopyFrom(onnx.numpy_helper.from_array(arr, node.name))
    report = verify(proto, model)
    assert not report.ok and any("max |diff|" in p for p in report.problems)


def test_hidden_is_optional_in_the_contract(text_runs):
    """A file exported before `hidden` existed still conforms; a wrong hidden, or another output, does not."""
    proto = onnx.load(str(text_runs["gru"] / "model.onnx"))
    hidden = next(o for o in proto.graph.output if o.name == "hidden")
    proto.graph.output.remove(hidden)
    assert violations(proto) == []
    proto.graph.output.append(hidden)  # a copy
    hidden = proto.graph.output[-1]
    hidden.type.tensor_type.shape.dim[3].dim_value = 31
    assert violations(proto) == ["hidden has shape ['batch', 'seq', 2, 31], expected ['batch', 'seq', 2, 32]"]
    hidden.name = "attention"
    assert any("(and optionally hidden)" in p for p in violations(proto))


def test_contract_violations_are_named(text_runs):
    proto = onnx.load(str(text_runs["rnn"] / "model.onnx"))
    proto.graph.input[0].name = "tokens"
    assert any("graph inputs" in p for p in violations(proto))
    proto = onnx.load(str(text_runs["rnn"] / "model.onnx"))
    for p in proto.metadata_props:
        if p.key == "vocab":
            p.value = '"abc"'
    assert violations(proto) == ["metadata 'vocab' is not a JSON array of distinct single-character strings"]


@pytest.mark.parametrize("key, value", [("num_layers", "abc"), ("hidden_size", ""), ("state_size", "-32"),
                                        ("num_layers", "\u0662"), ("hidden_size", " 32")])
def test_non_numeric_metadata_is_a_violation_not_a_traceback(text_runs, key, value):
    proto = onnx.load(str(text_runs["rnn"] / "model.onnx"))
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value
    assert violations(proto) == [f"metadata '{key}' must be a positive decimal integer, got {value!r}"]


def test_a_failure_inside_the_torch_exporter_is_an_export_error(text_runs):
    ckpt = checkpoint.load(text_runs["gru"])
    model = rebuild(ckpt)
    model.config = dataclasses.replace(model.config, num_layers=3)  # its example state no longer fits the GRU
    with pytest.raises(ExportError, match=r"^RuntimeError: .*hidden"):
        to_onnx(model, ckpt["vocab"], {})


def test_export_reports_an_exporter_failure_in_one_line(tmp_path, tiny_corpus):
    """A vocabulary ONNX cannot hold (a lone surrogate, as a corpus decoded with surrogateescape gives):
    exit 1 with the reason, no traceback, nothing written."""
    run_stage("train", "--corpus", str(tiny_corpus), "--hidden", "8", "--layers", "1", "--steps", "1",
              "--batch-size", "2", "--seq-len", "8", "--out", str(tmp_path))
    ckpt = checkpoint.load(tmp_path)
    ckpt["vocab"][0] = "\udcff"
    checkpoint.save(tmp_path / checkpoint.FILENAME, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    proc = run_stage("export", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"export: error: {tmp_path}: the exporter failed (UnicodeEncodeError: " in proc.stderr, proc.stderr
    assert "surrogates not allowed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_missing_and_corrupt_checkpoint_exit_nonzero(tmp_path):
    proc = run_stage("export", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr and str(tmp_path) in proc.stderr
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x04 definitely not a checkpoint")
    proc = run_stage("export", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_contract_only_consumer_gets_ihello(hihell_run):
    """What an outside runtime does, knowing only the contract table: no torch, no project code."""
    sess = ort.InferenceSession(str(hihell_run / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    vocab = json.loads(meta["vocab"])
    ids = np.array([[vocab.index(c) for c in "hihell"]], dtype=np.int64)
    zero = np.zeros((1, int(meta["num_layers"]), int(meta["state_size"])), dtype=np.float32)
    logits, final = sess.run(["logits", "state_out"], {"input_ids": ids, "state_in": zero})
    assert "".join(vocab[i] for i in logits[0].argmax(-1)) == "ihello"
    state, stepped = zero, []
    for t in range(6):
        step_logits, state = sess.run(["logits", "state_out"], {"input_ids": ids[:, t : t + 1], "state_in": state})
        stepped.append(step_logits)
    assert np.abs(np.concatenate(stepped, axis=1) - logits).max() <= 1e-5
    assert np.abs(state - final).max() <= 1e-5


def test_sample_reads_only_the_onnx_file(text_runs, capsys):
    from export.sample import sample

    text = sample(str(text_runs["gru"] / "model.onnx"), "it was", 30, 0.8, seed=5)
    again = sample(str(text_runs["gru"] / "model.onnx"), "it was", 30, 0.8, seed=5)
    assert len(text) == 30 and text == again


def _copy_run(src, dst, edit=lambda ckpt: None, version=None):
    """dst/checkpoint.pt: src's checkpoint after edit(ckpt), optionally stamped with another format version."""
    ckpt = checkpoint.load(src)
    edit(ckpt)
    dst.mkdir(parents=True, exist_ok=True)
    if version is None:
        checkpoint.save(dst / "checkpoint.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    else:
        torch.save({**ckpt, "version": version}, dst / "checkpoint.pt")
    return dst


def test_export_refuses_nonfinite_weights(text_runs, tmp_path):
    def poison(ckpt):
        ckpt["model_state"]["head.bias"][2] = float("nan")
        ckpt["model_state"]["layers.0.weight_hh_l0"][0, 0] = float("inf")

    run = _copy_run(text_runs["gru"], tmp_path / "nan", poison)
    proc = run_stage("export", str(run), check=False)
    print(proc.stdout + proc.stderr)
    assert proc.returncode == 1
    assert "FAIL: weights 'head.bias': 1 of" in proc.stdout
    assert "FAIL: weights 'layers.0.weight_hh_l0': 1 of" in proc.stdout
    assert "not written" in proc.stderr and not (run / "model.onnx").exists()


def test_verify_fails_when_onnxruntime_outputs_nan(text_runs):
    """NaN in the graph alone: every difference is NaN, and `nan > tol` is False; verify must still fail."""
    ckpt = checkpoint.load(text_runs["gru"])
    model = rebuild(ckpt)
    proto = to_onnx(model, ckpt["vocab"], {})
    for node in proto.graph.initializer:
        if node.dims == [len(ckpt["vocab"])]:
            arr = onnx.numpy_helper.to_array(node).copy()
            arr[:] = np.nan
            node.CopyFrom(onnx.numpy_helper.from_array(arr, node.name))
    report = verify(proto, model)
    assert not report.ok
    assert any("outputs are not finite" in p for p in report.problems)
    assert any("max |diff| logits nan" in p for p in report.problems)


def _multi_layer_keys(state: dict) -> dict:
    """Version 1 and 2 files hold one multi-layer nn.RNN/GRU/LSTM: layers.1.weight_ih_l0 was rnn.weight_ih_l1."""
    return {re.sub(r"^layers\.(\d+)\.(\w+)_l0$", r"rnn.\2_l\1", k): v for k, v in state.items()}


def test_a_version_1_checkpoint_still_exports(text_runs, tmp_path):
    def as_version_1(ckpt):  # what the trainer wrote before the windowed protocol and the layer stack existed
        for key in ("best_val_loss_windowed", "best_val_bpc_windowed", "best_windowed_se", "best_val_bpc",
                    "train_seconds", "eval_seconds", "chars_per_second"):
            ckpt["summary"].pop(key)
        ckpt["model_state"] = _multi_layer_keys(ckpt["model_state"])
        assert "rnn.weight_ih_l1" in ckpt["model_state"]

    run = _copy_run(text_runs["rnn"], tmp_path / "v1", as_version_1, version=1)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["version"] == 1
    run_stage("export", str(run))
    meta = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}
    assert meta["val_loss_windowed"] == "" and float(meta["val_loss"]) > 0
    # no ended_at in the summary: the checkpoint file's time, fixed for the file, so re-exports stay the same
    assert meta["exported_at"].endswith("+00:00")
    before = (run / "model.onnx").read_bytes()
    run_stage("export", str(run))
    assert (run / "model.onnx").read_bytes() == before
    # the same weights as the version 3 file they came from: the ONNX outputs are identical
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    zero = np.zeros((1, 2, 32), dtype=np.float32)
    old, new = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids, "state_in": zero}) for path in (run / "model.onnx", text_runs["rnn"] / "model.onnx"))
    assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))


def test_a_version_2_checkpoint_exports_the_same_graph(text_runs, tmp_path):
    """A file of the multi-layer module (version 2) rebuilds the stack bit for bit, and its ONNX file keeps the
    contract: one recurrent operator per layer, the same inputs, outputs and metadata keys."""
    run = _copy_run(text_runs["lstm"], tmp_path / "v2",
                    lambda ckpt: ckpt.update(model_state=_multi_layer_keys(ckpt["model_state"])), version=2)
    new = rebuild(checkpoint.load(text_runs["lstm"]))
    old = rebuild(checkpoint.load(run))
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True))
    run_stage("export", str(run))
    proto = onnx.load(str(run / "model.onnx"))
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 2
    assert violations(proto) == []
    keys = {p.key for p in proto.metadata_props}
    assert keys == {p.key for p in onnx.load(str(text_runs["lstm"] / "model.onnx")).metadata_props}


def test_parity_is_relative_to_the_outputs_size_above_one(text_runs):
    """Logits in the tens of thousands differ by float32 rounding well above 1e-4 and still pass; +1 still fails."""
    ckpt = checkpoint.load(text_runs["gru"])
    model = rebuild(ckpt)
    with torch.no_grad():
        model.head.weight.mul_(10000.0)
    report = verify(to_onnx(model, ckpt["vocab"], {}), model)
    assert max(lo for lo, *_ in report.parity.values()) > 1e-4  # an absolute 1e-4 would refuse this file
    assert report.ok, report.problems
