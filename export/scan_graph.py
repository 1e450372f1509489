"""The contract's graph with every weight product a MatMul: the float graph that int8 export quantizes.

torch.onnx writes one ONNX GRU/LSTM/RNN operator per layer (export/to_onnx.py), and onnxruntime's dynamic
quantization has no quantized GRU or RNN (only DynamicQuantizeLSTM). So this module writes the same model
from the checkpoint's weights with onnx.helper, in a form whose products are plain MatMuls that
quantize_dynamic turns into int8 ones (export/int8.py):

  ids -> Gather(table)                       layer 0's input projection: a row per character, float
  per layer: Scan over time (batch-first)    body: MatMul(h, W_hh^T) + the gates of the cell
             MatMul(ys, W_ih^T) + b_ih       the next layer's input projection, all time steps at once
  MatMul(ys, W_head^T) + b_head              logits

Why this shape:
- Layer 0's input is one character, so its projection embed @ W_ih^T + b_ih is a [vocab, gates] table
  computed here once (onehot input: W_ih^T's rows); a Gather of float rows is exact and costs nothing, and
  int8 would gain nothing on a lookup.
- One Scan per layer, as the float file has one recurrent op per layer: the MatMul inside the body is
  the only work per time step, and the next layer's input projection runs outside it over [batch, seq]
  in one product, which is what makes a long prefill cheap. At seq 1 (the serving step) each Scan runs
  its body once.
- The biases that only add to a gate's sum (all of LSTM's and RNN's b_hh, GRU's r and z parts) are
  folded into b_ih (and the table), so the body adds nothing it need not; GRU's b_hn stays inside, as
  r multiplies it.
- The same form for all three cells, LSTM included: one builder and one quantizer path. onnxruntime's
  DynamicQuantizeLSTM would quantize the float file's LSTM op too, but only LSTM, and it is a contrib op.

The weights of a Scan body are initializers of the outer graph, read by name from inside the body (ONNX
outer-scope values); the quantizer finds them there with EnableSubgraph (export/int8.py checks it did).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.contract import BATCH, HIDDEN, INPUTS, OUTPUTS, SEQ
from export.to_onnx import OPSET
from train.model import CharRNN

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def scan_graph(model: CharRNN, meta: dict[str, str]) -> onnx.ModelProto:
    """The float graph in Scan/MatMul form, with the contract's inputs, outputs and the given metadata."""
    cfg = model.config
    weights = {k: v.detach().to(torch.float64).numpy() for k, v in model.state_dict().items()}
    h, layers, gates = cfg.hidden_size, cfg.num_layers, GATES[cfg.cell]
    b = _Builder()

    embed = np.eye(cfg.vocab_size) if cfg.input == "onehot" else weights["embed.weight"]
    x = ""
    states, outputs = [], []
    for i in range(layers):
        w_ih, w_hh = weights[f"layers.{i}.weight_ih_l0"], weights[f"layers.{i}.weight_hh_l0"]
        b_ih, b_hh = weights[f"layers.{i}.bias_ih_l0"], weights[f"layers.{i}.bias_hh_l0"].copy()
        inner = np.zeros_like(b_hh)  # the part of b_hh that stays inside the body: GRU's b_hn
        if cfg.cell == "gru":
            inner[2 * h :], b_hh[2 * h :] = b_hh[2 * h :], 0.0
        bias = b_ih + b_hh
        if i == 0:
            gx = b.node("Gather", [b.const("input_table", embed @ w_ih.T + bias), "input_ids"], axis=0)
        else:
            gx = b.node("Add", [b.node("MatMul", [x, b.const(f"layers.{i}.w_ih_t", w_ih.T)]),
                                b.const(f"layers.{i}.b_ih", bias)])
        state = b.node("Gather", ["state_in", b.const(f"layers.{i}.index", np.array(i, np.int64))], axis=1)
        if cfg.cell == "lstm":
            firsts = [b.node("Slice", [state, b.ints([0]), b.ints([h]), b.ints([1])]),
                      b.node("Slice", [state, b.ints([h]), b.ints([2 * h]), b.ints([1])])]
        else:
            firsts = [state]
        body = _body(cfg.cell, h, gates, f"layers.{i}.w_hh_t", f"layers.{i}.b_hn" if cfg.cell == "gru" else None)
        b.const(f"layers.{i}.w_hh_t", w_hh.T)
        if cfg.cell == "gru":
            b.const(f"layers.{i}.b_hn", inner[2 * h :])
        n_state = len(firsts)
        scan_out = [b.name("scan") for _ in range(n_state + 1)]
        b.nodes.append(helper.make_node("Scan", [*firsts, gx], scan_out, name=b.name("Scan"), body=body,
                                        num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1]))
        finals, x = scan_out[:n_state], scan_out[n_state]
        states.append(finals[0] if n_state == 1 else b.node("Concat", finals, axis=1))
        outputs.append(x)

    b.node("Add", [b.node("MatMul", [x, b.const("head.w_t", weights["head.weight"].T)]),
                   b.const("head.bias", weights["head.bias"])], out=OUTPUTS[0])
    b.node("Concat", [b.node("Unsqueeze", [s, b.ints([1])]) for s in states], axis=1, out=OUTPUTS[1])
    b.node("Concat", [b.node("Unsqueeze", [y, b.ints([2])]) for y in outputs], axis=2, out=HIDDEN)

    graph = helper.make_graph(
        b.nodes, "charrnn",
        [helper.make_tensor_value_info(INPUTS[0], TensorProto.INT64, [BATCH, SEQ]),
         helper.make_tensor_value_info(INPUTS[1], TensorProto.FLOAT, [BATCH, layers, cfg.state_size])],
        [helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, [BATCH, SEQ, cfg.vocab_size]),
         helper.make_tensor_value_info(OUTPUTS[1], TensorProto.FLOAT, [BATCH, layers, cfg.state_size]),
         helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, [BATCH, SEQ, layers, h])],
        initializer=b.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="charrnn")
    proto.ir_version = 8  # what torch.onnx writes at opset 17; onnxruntime and Triton read it
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def _body(cell: str, h: int, gates: int, w_hh: str, b_hn: str | None) -> onnx.GraphProto:
    """One time step of one layer: (state..., gx_t [B, gates*H]) -> (state'..., h'). w_hh and b_hn name
    outer-graph initializers."""
    b = _Builder(w_hh.rsplit(".", 1)[0] + ".")
    hp, cp, gx = (b.prefix + n for n in ("h_prev", "c_prev", "gx"))
    states_in = [hp, cp] if cell == "lstm" else [hp]
    gh = b.node("MatMul", [hp, w_hh])
    if cell == "rnn":
        new = [b.node("Tanh", [b.node("Add", [gx, gh])])]
    elif cell == "gru":  # PyTorch's gate order r, z, n; n = tanh(gx_n + r * (h W_hn^T + b_hn))
        gx_rz, gx_n = b.split([gx, b.ints([2 * h, h])], 2, axis=1)
        gh_rz, gh_n = b.split([gh, b.ints([2 * h, h])], 2, axis=1)
        r, z = b.split([b.node("Sigmoid", [b.node("Add", [gx_rz, gh_rz])])], 2, axis=1)
        assert b_hn is not None
        n = b.node("Tanh", [b.node("Add", [gx_n, b.node("Mul", [r, b.node("Add", [gh_n, b_hn])])])])
        new = [b.node("Add", [n, b.node("Mul", [z, b.node("Sub", [hp, n])])])]  # (1 - z) n + z h
    else:  # lstm: i, f, g, o
        i, f, g, o = b.split([b.node("Add", [gx, gh])], 4, axis=1)
        c = b.node("Add", [b.node("Mul", [b.node("Sigmoid", [f]), cp]),
                           b.node("Mul", [b.node("Sigmoid", [i]), b.node("Tanh", [g])])])
        new = [b.node("Mul", [b.node("Sigmoid", [o]), b.node("Tanh", [c])]), c]
    y = b.node("Identity", [new[0]])  # a scan output of its own name: the final state is a separate output
    width = {hp: h, cp: h, gx: gates * h}
    return helper.make_graph(
        b.nodes, "step",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, width[n]]) for n in [*states_in, gx]],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, h]) for n in [*new, y]],
        initializer=b.initializers)


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
