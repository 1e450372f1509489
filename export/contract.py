"""The ONNX contract between export and every runtime that loads model.onnx (our server, Triton, others).

| name       | direction | dtype   | shape                              |
|------------|-----------|---------|------------------------------------|
| input_ids  | input     | int64   | [batch, seq]                       |
| state_in   | input     | float32 | [batch, num_layers, state_size]    |
| logits     | output    | float32 | [batch, seq, vocab] (unnormalised) |
| state_out  | output    | float32 | [batch, num_layers, state_size]    |
| hidden     | output    | float32 | [batch, seq, num_layers, hidden_size] (optional) |

`hidden` is every layer's h after every input character (for LSTM the h half of the state); its last
position equals the h part of state_out. Export writes it since the playground (issue 20); readers
must accept a file without it (older exports), and a runtime that does not fetch it still computes it.
"""

from __future__ import annotations

import json

import onnx

BATCH, SEQ = "batch", "seq"
INPUTS = ("input_ids", "state_in")
OUTPUTS = ("logits", "state_out")
HIDDEN = "hidden"
OPTIONAL_OUTPUTS = (HIDDEN,)
REQUIRED_METADATA = ("vocab", "cell", "num_layers", "hidden_size", "state_size")
COUNTS = ("num_layers", "hidden_size", "state_size")  # positive decimal integers, as the server reads them
DTYPES = {"input_ids": onnx.TensorProto.INT64, "state_in": onnx.TensorProto.FLOAT,
          "logits": onnx.TensorProto.FLOAT, "state_out": onnx.TensorProto.FLOAT, HIDDEN: onnx.TensorProto.FLOAT}


def expected_dims(meta: dict[str, str]) -> dict[str, list[str | int]]:
    layers, state, vocab = int(meta["num_layers"]), int(meta["state_size"]), len(json.loads(meta["vocab"]))
    return {
        "input_ids": [BATCH, SEQ],
        "state_in": [BATCH, layers, state],
        "logits": [BATCH, SEQ, vocab],
        "state_out": [BATCH, layers, state],
        HIDDEN: [BATCH, SEQ, layers, int(meta["hidden_size"])],
    }


def dims_of(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def violations(model: onnx.ModelProto) -> list[str]:
    """Every way the graph's interface or metadata departs from the contract; empty means it conforms."""
    problems = []
    meta = {p.key: p.value for p in model.metadata_props}
    for key in REQUIRED_METADATA:
        if key not in meta:
            problems.append(f"metadata_props lacks '{key}'")
    if problems:
        return problems
    try:
        vocab = json.loads(meta["vocab"])
        assert isinstance(vocab, list) and vocab and all(isinstance(c, str) and len(c) == 1 for c in vocab)
        assert len(set(vocab)) == len(vocab)
    except (ValueError, AssertionError):
        return ["metadata 'vocab' is not a JSON array of distinct single-character strings"]
    # ASCII digits only, as serve/engine/runtime.py reads them: int() also takes ' 4', '٢' and '1_0'
    problems = [f"metadata '{key}' must be a positive decimal integer, got {meta[key]!r}" for key in COUNTS
                if not (meta[key].isascii() and meta[key].isdecimal() and int(meta[key]) > 0)]
    if problems:
        return problems
    state = int(meta["state_size"])
    hidden = int(meta["hidden_size"])
    if state != (2 * hidden if meta["cell"] == "lstm" else hidden):
        problems.append(f"state_size {state} does not fit cell {meta['cell']} with hidden_size {hidden}")
    want = expected_dims(meta)
    for kind, values, required in (("input", model.graph.input, INPUTS), ("output", model.graph.output, OUTPUTS)):
        got = {v.name: v for v in values}
        optional = OPTIONAL_OUTPUTS if kind == "output" else ()
        names = (*required, *(n for n in optional if n in got))
        if sorted(got) != sorted(names):
            extra = f" (and optionally {', '.join(optional)})" if optional else ""
            problems.append(f"graph {kind}s are {sorted(got)}, expected {sorted(required)}{extra}")
            continue
        for name in names:
            if got[name].type.tensor_type.elem_type != DTYPES[name]:
                problems.append(f"{name} has element type {got[name].type.tensor_type.elem_type}, "
                                f"expected {DTYPES[name]}")
            if dims_of(got[name]) != want[name]:
                problems.append(f"{name} has shape {dims_of(got[name])}, expected {want[name]}")
    return problems


def without_hidden(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its optional `hidden` output, nor the nodes only it used: a file as
    export wrote it before that output existed (for tests and bench/hidden.py)."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    kept = [o for o in graph.output if o.name != HIDDEN]
    del graph.output[:]
    graph.output.extend(kept)
    while True:
        needed = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(out in needed for out in n.output)]
        if not dead:
            return pruned
        for node in dead:
            graph.node.remove(node)
