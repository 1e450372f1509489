"""int8 export: the Scan/MatMul graph (export/scan_graph.py) through onnxruntime's dynamic quantization,
and the checks that judge the result before it is written.

    python -m export runs/demo --quantize int8     # writes runs/demo/model.int8.onnx

Dynamic quantization (onnxruntime.quantization.quantize_dynamic): each MatMul's constant weight is stored
as int8 with a scale and zero point; its float input is quantized to uint8 on every call
(DynamicQuantizeLinear, over the whole input tensor), multiplied in integers (MatMulInteger) and scaled
back to float. onnxruntime fuses that chain into one DynamicQuantizeMatMul when it loads the file. Only
MatMul is quantized: the input table stays a float Gather, and the gates' elementwise ops stay float.
EnableSubgraph quantizes the MatMuls inside the Scan bodies, whose weights are outer-graph initializers;
`int8_weights` proves that every MatMul weight, in every body, became int8.

What int8 changes, and what the checks allow for it:
- Outputs are not PyTorch's within 1e-4: parity is judged on the next-character distribution, the
  largest KL(PyTorch || int8) over the checks' positions <= KL_TOLERANCE (what sampling sees; a plain
  |Δ log-prob| is ruled by characters no one samples, -30 against -25 in a saturated model), and on
  state and hidden by the root mean square of their differences within STATE_TOLERANCE (the largest
  single difference is ruled by the few units whose tanh sits at its steepest: 0.07 to 0.13 on the
  recipe model, whose RMS is 0.008 to 0.013). Quality is judged by export.evaluate on a corpus
  (docs/int8.md quotes it).
- A model int8 cannot hold is refused like a broken one: the seed lesson's 5-unit RNN (weights near 3,
  saturated) reaches KL 0.11 on random characters (its hidden units flip) and is not written.
- The activation scale is taken over the whole call's input, so one row's outputs depend (slightly) on
  the other rows of its batch, and a whole sequence differs (slightly) from the same text fed one
  character at a time. The float file has neither property; both stay within the tolerances above.
- Everything else is as for the float file: the same inputs, outputs, shapes and metadata (plus the
  `quantization` key), finite weights and outputs, hidden's last position bit-equal to state_out's h.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from export.check import SHAPES, file_problems, session
from export.contract import dims_of
from train.model import CharRNN

QUANTIZATION = "quantization"  # the metadata key an int8 file adds; the float file has none
SCHEME = ("int8 dynamic: MatMul weights int8 (7-bit range) per output column, activations uint8 per call "
          "(onnxruntime quantize_dynamic)")
# Measured (docs/int8.md): tiny-shakespeare's recipe model, GRU 2x256, reaches 0.0033 nats at worst over
# the checks' inputs (0.011 with one scale per tensor); models of the tests' size 1e-5. 0.02 leaves room for
# other corpora and sizes and still fails a weight scaled wrong or the saturated lesson model (0.11).
KL_TOLERANCE = 0.02
# 7-bit weights (reduce_range): on a CPU without VNNI (AVX2: this project's CI machines) onnxruntime multiplies
# uint8 activations by int8 weights with vpmaddubsw, whose int16 pair sums saturate when weights use all 8
# bits. Measured on random GRU/LSTM/RNN 2x64 models: max |Δ log-prob| 0.077/0.029/0.194 with 8 bits,
# 0.004/0.002/0.011 with 7; state 0.10/0.04/0.24 against 0.004/0.002/0.014. A VNNI CPU does not saturate,
# and 7 bits cost it little.
REDUCE_RANGE = True
# One scale per output column: trained weights have a few large values that set a whole tensor's scale. On
# tiny-shakespeare's recipe model per tensor costs +0.0022 nats/char carried, per column -0.0002 (noise);
# max KL 0.011 against 0.003. Its speed is the same within the noise (docs/int8.md).
PER_CHANNEL = True
# RMS |Δ| of state and hidden, whose values lie in [-1, 1]: the recipe model reaches 0.013 (0.029 with one
# scale per tensor); a wrong gate or bias is off by 0.3 and more.
STATE_TOLERANCE = 0.05


class QuantizeError(Exception):
    """onnxruntime's quantizer failed, or left a MatMul in float."""


def quantize(float_graph: onnx.ModelProto, per_channel: bool = PER_CHANNEL,
             reduce_range: bool = REDUCE_RANGE) -> onnx.ModelProto:
    """The int8 model of a float Scan graph (export/scan_graph.py), its metadata and the `quantization` key."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # imports onnxruntime's quantizer lazily

    meta = {p.key: p.value for p in float_graph.metadata_props}
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():  # quantize_dynamic writes its result to a file
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(float_graph, source)
        try:
            quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], per_channel=per_channel,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8,
                             extra_options={"EnableSubgraph": True})
        except Exception as exc:  # the quantizer raises many unrelated types
            raise QuantizeError(f"quantize_dynamic failed: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load(target)
    left = float_matmuls(proto.graph)
    if left:
        raise QuantizeError(f"MatMul(s) left in float after quantization: {', '.join(left)}")
    del proto.metadata_props[:]
    for key, value in {**meta, QUANTIZATION: SCHEME}.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "charrnn"
    proto.doc_string = "charrnn char-level RNN, int8 weights; recurrent state is the explicit state_in/state_out pair"
    return proto


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic warns on the root logger to "consider pre-processing" (shape inference and graph
    optimisation for models from other exporters); this graph is written whole here, with its shapes."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def float_matmuls(graph: onnx.GraphProto) -> list[str]:
    """The names of the MatMul nodes in graph and its subgraphs (none are left in an int8 file)."""
    found = [n.name or n.output[0] for n in graph.node if n.op_type == "MatMul"]
    for sub in subgraphs(graph):
        found += float_matmuls(sub)
    return found


def subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    return [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]


def int8_weights(graph: onnx.GraphProto) -> tuple[int, int]:
    """(tensors, bytes) of the int8 weight initializers, zero points aside."""
    tensors = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    return len(tensors), sum(math.prod(t.dims) for t in tensors)


@dataclass
class Int8Report:
    problems: list[str] = field(default_factory=list)
    parity: dict[tuple[int, int], tuple[float, float, float]] = field(default_factory=dict)  # (KL, state, hidden)
    threading: tuple[float, float] = (float("nan"), float("nan"))
    weights: tuple[int, int] = (0, 0)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"  int8 vs PyTorch, batch {b} seq {s}: max KL {lp:.2e} nats, rms |diff| state {st:.2e}, hidden {hi:.2e}"
               for (b, s), (lp, st, hi) in self.parity.items()]
        if self.parity:
            out.append(f"  whole sequence vs one char at a time: max KL {self.threading[0]:.2e} nats, "
                       f"rms |diff| state {self.threading[1]:.2e}")
            out.append(f"  int8 weights: {self.weights[0]} MatMul weight tensors, {self.weights[1] / 1024:.0f} KiB; "
                       "no MatMul left in float")
        out += [f"  FAIL: {p}" for p in self.problems]
        return out


def verify_int8(proto: onnx.ModelProto, model: CharRNN, reference: onnx.ModelProto, seed: int = 0) -> Int8Report:
    """The int8 file against PyTorch within the tolerances above, and its contract against the float file's
    (reference: what export writes without --quantize)."""
    report = Int8Report()
    report.problems += file_problems(proto, model)
    report.problems += contract_differences(proto, reference)
    left = float_matmuls(proto.graph)
    if left:
        report.problems.append(f"MatMul(s) left in float: {', '.join(left)}")
    report.weights = int8_weights(proto.graph)
    if report.problems:
        return report
    sess = session(proto.SerializeToString())
    rng = torch.Generator().manual_seed(seed)
    cfg = model.config
    for batch, seq in SHAPES:
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=rng)
        with torch.no_grad():
            state = _warm_state(model, batch, rng)
            want = [t.numpy() for t in model.trace(ids, state)]
        got = sess.run(None, {"input_ids": ids.numpy(), "state_in": state.numpy()})
        if not all(np.isfinite(g).all() for g in got):
            report.problems.append(f"batch {batch} seq {seq}: onnxruntime outputs are not finite")
        if [g.shape for g in got] != [w.shape for w in want]:
            report.problems.append(f"batch {batch} seq {seq}: onnxruntime shapes {[g.shape for g in got]}; "
                                   f"PyTorch {[w.shape for w in want]}")
            continue
        diff = (max_kl(want[0], got[0]), _rms(got[1], want[1]), _rms(got[2], want[2]))
        report.parity[(batch, seq)] = diff
        if not _within(diff, (KL_TOLERANCE, STATE_TOLERANCE, STATE_TOLERANCE)):
            report.problems.append(f"batch {batch} seq {seq}: max KL {diff[0]:.2e} nats, rms |diff| state "
                                   f"{diff[1]:.2e}, hidden {diff[2]:.2e}; limits {KL_TOLERANCE:g}, {STATE_TOLERANCE:g}")
        if not np.array_equal(got[2][:, -1], got[1][:, :, : cfg.hidden_size]):
            report.problems.append(f"batch {batch} seq {seq}: hidden at the last character differs from state_out's h")

    chain = torch.randint(0, cfg.vocab_size, (3, 12), generator=rng).numpy()
    zero = np.zeros((3, cfg.num_layers, cfg.state_size), dtype=np.float32)
    whole_logits, whole_state = sess.run(["logits", "state_out"], {"input_ids": chain, "state_in": zero})
    carried, steps = zero, []
    for t in range(chain.shape[1]):
        logits, carried = sess.run(["logits", "state_out"], {"input_ids": chain[:, t : t + 1], "state_in": carried})
        steps.append(logits)
    report.threading = (max_kl(whole_logits, np.concatenate(steps, axis=1)),
                        _rms(carried, whole_state))
    if not _within(report.threading, (KL_TOLERANCE, STATE_TOLERANCE)):
        report.problems.append(f"state threading: max KL {report.threading[0]:.2e} nats, rms |diff| state "
                               f"{report.threading[1]:.2e}; limits {KL_TOLERANCE:g}, {STATE_TOLERANCE:g}")
    return report


def _warm_state(model: CharRNN, batch: int, rng: torch.Generator) -> torch.Tensor:
    """A state the model itself reaches (after 16 random characters from zero): the range a server feeds,
    which sets the activations' int8 scale. A random state (the float checks' 0.5 x randn) reaches
    beyond tanh's [-1, 1] and would judge int8 on inputs it never meets."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), generator=rng)
    state: torch.Tensor = model(ids, model.init_state(batch))[1]
    return state


def contract_differences(proto: onnx.ModelProto, reference: onnx.ModelProto) -> list[str]:
    """How proto's interface or metadata keys differ from the float file's (the `quantization` key aside)."""

    def interface(m: onnx.ModelProto) -> list[tuple[str, int, list[str | int]]]:
        return [(v.name, v.type.tensor_type.elem_type, dims_of(v)) for v in [*m.graph.input, *m.graph.output]]

    problems = []
    if interface(proto) != interface(reference):
        problems.append(f"inputs and outputs {interface(proto)} differ from the float file's {interface(reference)}")
    meta, want = {p.key: p.value for p in proto.metadata_props}, {p.key: p.value for p in reference.metadata_props}
    if {k: v for k, v in meta.items() if k != QUANTIZATION} != want:
        problems.append(f"metadata differs from the float file's: keys {sorted(meta)} vs {sorted(want)}")
    return problems


def max_kl(want: np.ndarray, got: np.ndarray) -> float:
    """The largest KL(want || got) in nats over the positions of two logits arrays [..., vocab]: what
    sampling from got instead of want costs at the worst character, blind to the log-probabilities of
    characters neither would pick (a saturated model's -30 against -25)."""
    log_want, log_got = log_softmax(want), log_softmax(got)
    return float((np.exp(log_want) * (log_want - log_got)).sum(axis=-1).max())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    result: np.ndarray = x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
    return result


def _within(diffs: tuple[float, ...], limits: tuple[float, ...]) -> bool:
    return all(d <= lim for d, lim in zip(diffs, limits, strict=True))  # False for NaN


def _rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.square(got.astype(np.float64) - want).mean()))
