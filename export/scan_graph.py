"""The contract's graph with every weight product a MatMul: the float graph that int8 export quantizes.

torch.onnx writes one ONNX GRU/LSTM/RNN operator per layer (export/to_onnx.py), and onnxruntime's dynamic
quantization has no quantized GRU or RNN (only DynamicQuantizeLSTM). So this module writes the same model
from the checkpoint's weights with onnx.helper, in a form whose products are plain MatMuls that
quantize_dynamic turns into int8 ones (export/int8.py):

  ids -> Gather(table)                       layer 0's input projection: a row per character, float
  per layer: Scan over time (batch-first)    body: MatMul(h, W_hh^T) + the gates of the cell
             MatMul(ys, W_ih^T) + b_ih       the next layer's input projection, all time steps at once
  MatMul(ys, W_head^T) + b_head              logits

all of it in the else branch of an If on seq == 1, whose then branch is the same network for one step
with the cell's ops straight, no Scan.

Why this shape:
- Layer 0's input is one character, so its projection embed @ W_ih^T + b_ih is a [vocab, gates] table
  computed here once (onehot input: W_ih^T's rows); a Gather of float rows is exact and costs nothing, and
  int8 would gain nothing on a lookup.
- One Scan per layer, as the float file has one recurrent op per layer: the MatMul inside the body is
  the only weight product per time step, and the next layer's input projection runs outside it over
  [batch, seq] in one product.
- The If: seq 1 is the serving step, nearly every call a server makes, and entering a Scan costs more
  than the step's own small ops (measured on GRU 2x256, int8: 1036 against 1096 us at batch 64, 135
  against 148 at batch 1). Its price: a long prefill is about a third slower than with the Scan at the
  top (seq 64, batch 1: 3.5 against 2.6 ms), it seems because onnxruntime does not prepack the int8
  weights of a Scan body two graphs deep (session.disable_prepacking on the top-level Scan gives the
  same slowdown); docs/int8.md has the figures.
- The biases that only add to a gate's sum (all of LSTM's and RNN's b_hh, GRU's r and z parts) are
  folded into b_ih (and the table), so the body adds nothing it need not; GRU's b_hn stays inside, as
  r multiplies it.
- The same form for all three cells, LSTM included: one builder and one quantizer path. onnxruntime's
  DynamicQuantizeLSTM would quantize the float file's LSTM op too, but only LSTM, and it is a contrib op.

Every weight is an initializer of the top graph, read by name from inside the branches and bodies (ONNX
outer-scope values), so both branches share one copy; the quantizer finds them there with EnableSubgraph
(export/int8.py checks that no MatMul is left in float).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.contract import BATCH, HIDDEN, INPUTS, OUTPUTS, SEQ
from export.to_onnx import OPSET
from train.model import CharRNN

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


@dataclass(frozen=True)
class _Layer:
    """The names of one layer's initializers in the top graph."""

    index: str  # its row of state_in
    w_hh: str  # W_hh^T [H, gates*H]
    w_ih: str | None  # W_ih^T [H, gates*H]; None for layer 0, whose projection is the input table
    b_ih: str | None  # b_ih and the folded part of b_hh; None for layer 0 (in the table)
    b_hn: str | None  # GRU's b_hn, which stays inside the step


def scan_graph(model: CharRNN, meta: dict[str, str]) -> onnx.ModelProto:
    """The float graph in Scan/MatMul form, with the contract's inputs, outputs and the given metadata."""
    cfg = model.config
    weights = {k: v.detach().to(torch.float64).numpy() for k, v in model.state_dict().items()}
    h, n_layers = cfg.hidden_size, cfg.num_layers
    top = _Builder()
    embed = np.eye(cfg.vocab_size) if cfg.input == "onehot" else weights["embed.weight"]
    layers, table = [], ""
    for i in range(n_layers):
        w_ih, w_hh = weights[f"layers.{i}.weight_ih_l0"], weights[f"layers.{i}.weight_hh_l0"]
        b_ih, b_hh = weights[f"layers.{i}.bias_ih_l0"], weights[f"layers.{i}.bias_hh_l0"].copy()
        b_hn = None
        if cfg.cell == "gru":
            b_hn = top.const(f"layers.{i}.b_hn", b_hh[2 * h :])
            b_hh[2 * h :] = 0.0
        bias = b_ih + b_hh
        if i == 0:
            table = top.const("input_table", embed @ w_ih.T + bias)
        layers.append(_Layer(top.const(f"layers.{i}.index", np.array(i, np.int64)),
                             top.const(f"layers.{i}.w_hh_t", w_hh.T),
                             None if i == 0 else top.const(f"layers.{i}.w_ih_t", w_ih.T),
                             None if i == 0 else top.const(f"layers.{i}.b_ih", bias), b_hn))
    head = (top.const("head.w_t", weights["head.weight"].T), top.const("head.bias", weights["head.bias"]))

    types = [helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, [BATCH, SEQ, cfg.vocab_size]),
             helper.make_tensor_value_info(OUTPUTS[1], TensorProto.FLOAT, [BATCH, n_layers, cfg.state_size]),
             helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, [BATCH, SEQ, n_layers, h])]
    branches = {}
    for whole in (False, True):
        b = _Builder("seq." if whole else "step.")
        outs = _network(b, cfg.cell, h, table, layers, head, whole)
        outputs = []
        for name, typed in zip(outs, types, strict=True):
            declared = onnx.ValueInfoProto()
            declared.CopyFrom(typed)
            declared.name = name
            outputs.append(declared)
        branches[whole] = helper.make_graph(b.nodes, "sequence" if whole else "step", [], outputs,
                                            initializer=b.initializers)
    seq = top.node("Gather", [top.node("Shape", [INPUTS[0]]), top.const("one", np.array(1, np.int64))], axis=0)
    top.nodes.append(helper.make_node("If", [top.node("Equal", [seq, "one"])], [*OUTPUTS, HIDDEN], name="seq_is_1",
                                      then_branch=branches[False], else_branch=branches[True]))
    graph = helper.make_graph(
        top.nodes, "charrnn",
        [helper.make_tensor_value_info(INPUTS[0], TensorProto.INT64, [BATCH, SEQ]),
         helper.make_tensor_value_info(INPUTS[1], TensorProto.FLOAT, [BATCH, n_layers, cfg.state_size])],
        types, initializer=top.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charrnn")
    proto.ir_version = 8  # what torch.onnx writes at opset 17; onnxruntime and Triton read it
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def _network(b: _Builder, cell: str, h: int, table: str, layers: list[_Layer], head: tuple[str, str],
             whole: bool) -> list[str]:
    """logits, state_out and hidden as values of b: whole, a Scan per layer over [batch, seq]; else one
    step of a seq that is 1, the cell's ops straight (no Scan to enter: the serving step's case)."""
    x, states, outputs = "", [], []
    for i, layer in enumerate(layers):
        if layer.w_ih is None:
            gx = b.node("Gather", [table, INPUTS[0]], axis=0)
            gx = gx if whole else b.node("Squeeze", [gx, b.ints([1])])
        else:
            assert layer.b_ih is not None
            gx = b.node("Add", [b.node("MatMul", [x, layer.w_ih]), layer.b_ih])
        state = b.node("Gather", [INPUTS[1], layer.index], axis=1)
        firsts = [state]
        if cell == "lstm":
            firsts = [b.node("Slice", [state, b.ints([0]), b.ints([h]), b.ints([1])]),
                      b.node("Slice", [state, b.ints([h]), b.ints([2 * h]), b.ints([1])])]
        if whole:
            scan_out = [b.name("scan") for _ in range(len(firsts) + 1)]
            body = _body(f"{b.prefix}layers.{i}.", cell, h, layer)
            b.nodes.append(helper.make_node("Scan", [*firsts, gx], scan_out, name=b.name("Scan"), body=body,
                                            num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1]))
            finals, x = scan_out[:-1], scan_out[-1]
        else:
            finals = _cell(b, cell, h, firsts, gx, layer)
            x = finals[0]
        states.append(finals[0] if len(finals) == 1 else b.node("Concat", finals, axis=1))
        outputs.append(x)
    logits = b.node("Add", [b.node("MatMul", [x, head[0]]), head[1]])
    steps = [1] if whole else [1, 2]  # hidden's axes to add: [B, T, H] -> [B, T, 1, H]; [B, H] -> [B, 1, 1, H]
    return [logits if whole else b.node("Unsqueeze", [logits, b.ints([1])]),
            b.node("Concat", [b.node("Unsqueeze", [s, b.ints([1])]) for s in states], axis=1),
            b.node("Concat", [b.node("Unsqueeze", [y, b.ints([2] if whole else steps)]) for y in outputs], axis=2)]


def _body(prefix: str, cell: str, h: int, layer: _Layer) -> onnx.GraphProto:
    """The Scan body of one layer: (state..., gx_t [B, gates*H]) -> (state'..., h')."""
    b = _Builder(prefix)
    hp, cp, gx = (prefix + n for n in ("h_prev", "c_prev", "gx"))
    states_in = [hp, cp] if cell == "lstm" else [hp]
    new = _cell(b, cell, h, states_in, gx, layer)
    y = b.node("Identity", [new[0]])  # a scan output of its own name: the final state is a separate output
    width = {hp: h, cp: h, gx: GATES[cell] * h}
    return helper.make_graph(
        b.nodes, "step",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, width[n]]) for n in [*states_in, gx]],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, h]) for n in [*new, y]],
        initializer=b.initializers)


def _cell(b: _Builder, cell: str, h: int, states: list[str], gx: str, layer: _Layer) -> list[str]:
    """One time step's ops into b: states (h, and c for LSTM) [B, H] and gx [B, gates*H] -> the new states.
    gx holds the input projection and every bias that only adds; MatMul(h, W_hh^T) is the product int8 takes."""
    hp = states[0]
    gh = b.node("MatMul", [hp, layer.w_hh])
    if cell == "rnn":
        return [b.node("Tanh", [b.node("Add", [gx, gh])])]
    if cell == "gru":  # PyTorch's gate order r, z, n; n = tanh(gx_n + r * (h W_hn^T + b_hn))
        gx_rz, gx_n = b.split([gx, b.ints([2 * h, h])], 2, axis=1)
        gh_rz, gh_n = b.split([gh, b.ints([2 * h, h])], 2, axis=1)
        r, z = b.split([b.node("Sigmoid", [b.node("Add", [gx_rz, gh_rz])])], 2, axis=1)
        assert layer.b_hn is not None
        n = b.node("Tanh", [b.node("Add", [gx_n, b.node("Mul", [r, b.node("Add", [gh_n, layer.b_hn])])])])
        return [b.node("Add", [n, b.node("Mul", [z, b.node("Sub", [hp, n])])])]  # (1 - z) n + z h
    i, f, g, o = b.split([b.node("Add", [gx, gh])], 4, axis=1)  # lstm: i, f, g, o
    c = b.node("Add", [b.node("Mul", [b.node("Sigmoid", [f]), states[1]]),
                       b.node("Mul", [b.node("Sigmoid", [i]), b.node("Tanh", [g])])])
    return [b.node("Mul", [b.node("Sigmoid", [o]), b.node("Tanh", [c])]), c]


class _Builder:
    """Nodes with generated output names, and float32/int64 initializers."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # a body's names must not repeat the outer graph's: ONNX scopes are one namespace
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}{stem}_{self._count}"

    def const(self, name: str, value: np.ndarray) -> str:
        dtype = np.int64 if value.dtype == np.int64 else np.float32
        # np.array, not np.ascontiguousarray, which makes a 0-d index 1-d (and a Gather's output one rank more)
        self.initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype, order="C"), name))
        return name

    def ints(self, values: list[int]) -> str:
        return self.const(self.name("ints"), np.array(values, np.int64))

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        return self.split(inputs, 1, op=op, out=out, **attrs)[0]

    def split(self, inputs: list[str], count: int, op: str = "Split", out: str | None = None,
              **attrs: Any) -> list[str]:
        """An op of count outputs (Split by default: equal parts unless inputs give the sizes)."""
        names = [out] if out is not None else [self.name(op.lower()) for _ in range(count)]
        self.nodes.append(helper.make_node(op, inputs, names, name=self.name(op), **attrs))
        return names
