"""`python -m export --triton-repo`: config.pbtxt parses as Triton's ModelConfig and matches the ONNX file.

The configuration is parsed by tritonclient's own ModelConfig message (in .venv-triton, see
tests/tritonenv.py) and every field is checked against the graph read with onnx alone, not against the
code that wrote it. No Triton server can run here, so nothing proves that Triton loads the repository.
"""

from __future__ import annotations

import onnx
import pytest
from support import run_stage
from tritonenv import run_tritonside

from export.triton_repo import TritonModel, config_pbtxt

# The only element types the contract uses, as Triton's DataType names them.
TRITON_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}
# Every top-level field the configuration sets: one more (or one fewer) must be looked at here.
TOP_LEVEL = {"name", "platform", "max_batch_size", "input", "output", "sequence_batching"}


def _graph(path) -> tuple[dict, dict]:
    """name -> (Triton data type, dims without the batch dim, -1 where symbolic) for inputs and outputs."""
    model = onnx.load(str(path))

    def described(values):
        table = {}
        for v in values:
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param, f"{v.name}: the batch dimension must be symbolic for max_batch_size > 0"
            table[v.name] = (TRITON_TYPES[v.type.tensor_type.elem_type],
                             [-1 if d.dim_param else d.dim_value for d in dims[1:]])
        return table

    return described(model.graph.input), described(model.graph.output)


def _tensor(entry: dict) -> tuple[str, list[int]]:
    return entry["data_type"], [int(d) for d in entry["dims"]]  # protobuf's JSON writes int64 as strings


def check_against_onnx(config: dict, onnx_path, name: str) -> None:
    inputs, outputs = _graph(onnx_path)
    assert set(config) == TOP_LEVEL, set(config) ^ TOP_LEVEL
    assert config["name"] == name
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] >= 1

    fed = {entry["name"]: _tensor(entry) for entry in config["input"]}
    returned = {entry["name"]: _tensor(entry) for entry in config["output"]}
    assert fed == {"input_ids": inputs["input_ids"]}  # the client sends the ids and nothing else
    assert fed["input_ids"] == ("TYPE_INT64", [-1])
    assert returned["logits"] == outputs["logits"] and returned["logits"][1][0] == -1
    for out, described in returned.items():
        assert outputs[out] == described, out
    assert set(returned) == set(outputs)  # every graph output, hidden included

    batching = config["sequence_batching"]
    assert set(batching) == {"max_sequence_idle_microseconds", "oldest", "state"}  # no control_input
    assert int(batching["max_sequence_idle_microseconds"]) > 0
    assert batching["oldest"]["max_candidate_sequences"] >= config["max_batch_size"]
    (state,) = batching["state"]
    assert (state["input_name"], state["output_name"]) == ("state_in", "state_out")
    held = _tensor(state)
    assert held == inputs["state_in"] == outputs["state_out"]  # [num_layers, state_size], FP32
    assert -1 not in held[1]
    (initial,) = state["initial_state"]
    assert initial["zero_data"] is True and _tensor(initial) == held
    # Triton feeds every graph input: the client's inputs, and the state it holds.
    assert set(fed) | {state["input_name"]} == set(inputs)


def test_export_writes_the_repository(text_runs, tmp_path):
    out, repo = tmp_path / "model.onnx", tmp_path / "repo"
    proc = run_stage("export", str(text_runs["lstm"]), "--out", str(out), "--triton-repo", str(repo),
                     "--triton-name", "shakespeare-lstm")
    folder = repo / "shakespeare-lstm"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt"]
    assert (folder / "1/model.onnx").read_bytes() == out.read_bytes()
    assert f"wrote {folder / 'config.pbtxt'} and {folder / '1/model.onnx'}" in proc.stdout
    (config,) = run_tritonside("parse_config.py", str(folder / "config.pbtxt"))
    check_against_onnx(config, folder / "1/model.onnx", "shakespeare-lstm")


def test_every_cell_matches_its_file(text_runs, tmp_path):
    paths = []
    for cell, run in text_runs.items():
        graph = onnx.load(str(run / "model.onnx"))
        meta = {p.key: p.value for p in graph.metadata_props}
        model = TritonModel.of(meta, f"charrnn-{cell}", (o.name for o in graph.graph.output))
        assert model.hidden_size == int(meta["hidden_size"])  # the file has `hidden`: the config lists it
        paths.append(tmp_path / f"{cell}.pbtxt")
        paths[-1].write_text(config_pbtxt(model), encoding="utf-8")
    configs = run_tritonside("parse_config.py", *map(str, paths))
    for (cell, run), config in zip(text_runs.items(), configs, strict=True):
        check_against_onnx(config, run / "model.onnx", f"charrnn-{cell}")
    lstm = dict(zip(text_runs, configs, strict=True))["lstm"]
    assert [int(d) for d in lstm["sequence_batching"]["state"][0]["dims"]] == [2, 64]  # h then c


def test_the_parse_is_strict(tmp_path):
    """A field Triton's ModelConfig lacks fails the parse: the tests above would catch a misspelling."""
    model = TritonModel(name="charrnn", vocab_size=5, num_layers=1, state_size=5)
    bad = tmp_path / "bad.pbtxt"
    bad.write_text(config_pbtxt(model).replace("zero_data", "zeros"), encoding="utf-8")
    with pytest.raises(AssertionError, match="zeros"):
        run_tritonside("parse_config.py", str(bad))


def test_bad_repository_arguments_exit_2(hihell_run, tmp_path):
    proc = run_stage("export", str(hihell_run), "--triton-repo", str(tmp_path), "--triton-name", "../up",
                     check=False)
    assert proc.returncode == 2 and "model name '../up'" in proc.stderr and not any(tmp_path.iterdir())
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    out = tmp_path / "model.onnx"
    proc = run_stage("export", str(hihell_run), "--out", str(out), "--triton-repo", str(not_a_dir), check=False)
    assert proc.returncode == 2 and f"--triton-repo {not_a_dir} is not a directory" in proc.stderr
    assert not out.exists() and "Traceback" not in proc.stderr
