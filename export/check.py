"""Export proves itself before it reports success: checker, contract, finite weights, parity with PyTorch,
state threading. Every comparison is written so that NaN fails it (`nan > tol` is False, `nan <= tol` too)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.contract import violations
from train.model import CharRNN

# |diff| <= TOLERANCE x max(1, largest |output|): absolute for outputs up to 1, relative above. A long-trained
# saturated RNN amplifies float32 rounding along a sequence: the seed lesson trained 2,000 steps at lr 0.1
# has logits of 16 that differ by 1.05e-4 between onnxruntime and PyTorch, which is rounding, not a defect.
TOLERANCE = 1e-4
SHAPES = ((1, 1), (1, 17), (5, 1), (5, 9))  # (batch, seq): two of each, so nothing fixed can hide


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    parity: dict[tuple[int, int], tuple[float, float, float]] = field(default_factory=dict)  # (logits, state, hidden)
    threading: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"  onnxruntime vs PyTorch, batch {b} seq {s}: max |diff| logits {lo:.2e}, state {st:.2e}, "
               f"hidden {hi:.2e}" for (b, s), (lo, st, hi) in self.parity.items()]
        if self.parity:
            out.append(f"  whole sequence vs one char at a time: max |diff| logits {self.threading[0]:.2e}, "
                       f"state {self.threading[1]:.2e}")
        out += [f"  FAIL: {p}" for p in self.problems]
        return out


def session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def file_problems(proto: onnx.ModelProto, model: CharRNN) -> list[str]:
    """What is wrong with the file before it runs: onnx.checker, the contract, non-finite weights."""
    problems = []
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        problems.append(f"onnx.checker: {exc}")
    return problems + violations(proto) + nonfinite_weights(model)


def verify(proto: onnx.ModelProto, model: CharRNN, seed: int = 0) -> Report:
    report = Report()
    report.problems += file_problems(proto, model)
    if report.problems:
        return report
    sess = session(proto.SerializeToString())
    rng = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size

    hidden_size = model.config.hidden_size
    for batch, seq in SHAPES:
        ids = torch.randint(0, vocab, (batch, seq), generator=rng)
        state = torch.randn(batch, model.config.num_layers, model.config.state_size, generator=rng) * 0.5
        with torch.no_grad():
            want_logits, want_state, want_hidden = model.trace(ids, state)
        got_logits, got_state, got_hidden = sess.run(None, {"input_ids": ids.numpy(), "state_in": state.numpy()})
        if not (np.isfinite(got_logits).all() and np.isfinite(got_state).all() and np.isfinite(got_hidden).all()):
            report.problems.append(f"batch {batch} seq {seq}: onnxruntime outputs are not finite")
        got = (got_logits.shape, got_state.shape, got_hidden.shape)
        want = (tuple(want_logits.shape), tuple(want_state.shape), tuple(want_hidden.shape))
        if got != want:
            report.problems.append(f"batch {batch} seq {seq}: onnxruntime shapes {', '.join(map(str, got))}; "
                                   f"PyTorch {', '.join(map(str, want))}")
            continue
        diff = (_maxdiff(got_logits, want_logits), _maxdiff(got_state, want_state), _maxdiff(got_hidden, want_hidden))
        report.parity[(batch, seq)] = diff
        limits = (_limit(want_logits.numpy()), _limit(want_state.numpy()), _limit(want_hidden.numpy()))
        if not _within(diff, limits):
            report.problems.append(f"batch {batch} seq {seq}: max |diff| logits {diff[0]:.2e}, state {diff[1]:.2e}, "
                                   f"hidden {diff[2]:.2e}; limits {limits[0]:.2e}, {limits[1]:.2e}, {limits[2]:.2e}")
        # hidden's last position is state_out's h (all of it for GRU/RNN, the first half for LSTM)
        if not np.array_equal(got_hidden[:, -1], got_state[:, :, :hidden_size]):
            report.problems.append(f"batch {batch} seq {seq}: hidden at the last character differs from state_out's h")

    chain = torch.randint(0, vocab, (3, 12), generator=rng).numpy()
    zero = np.zeros((3, model.config.num_layers, model.config.state_size), dtype=np.float32)
    whole_logits, whole_state = sess.run(["logits", "state_out"], {"input_ids": chain, "state_in": zero})
    carried, steps = zero, []
    for t in range(chain.shape[1]):
        logits, carried = sess.run(["logits", "state_out"], {"input_ids": chain[:, t : t + 1], "state_in": carried})
        steps.append(logits)
    report.threading = (float(np.abs(np.concatenate(steps, axis=1) - whole_logits).max()),
                        float(np.abs(carried - whole_state).max()))
    chain_limits = (_limit(whole_logits), _limit(whole_state))
    if not _within(report.threading, chain_limits):
        report.problems.append(f"state threading: max |diff| logits {report.threading[0]:.2e}, state "
                               f"{report.threading[1]:.2e}; limits {chain_limits[0]:.2e}, {chain_limits[1]:.2e}")
    return report


def nonfinite_weights(model: CharRNN) -> list[str]:
    """A tensor holding NaN or Inf: such weights must not reach a server, whatever parity says."""
    problems = []
    for name, tensor in model.state_dict().items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            problems.append(f"weights '{name}': {bad} of {tensor.numel()} values are NaN or infinite")
    return problems


def _limit(want: np.ndarray) -> float:
    scale = float(np.abs(want).max()) if want.size else 0.0
    return TOLERANCE * max(1.0, scale) if math.isfinite(scale) else math.nan


def _within(diffs: tuple[float, ...], limits: tuple[float, ...]) -> bool:
    return all(d <= lim for d, lim in zip(diffs, limits, strict=True))  # False for NaN, unlike max(diff) > limit


def _maxdiff(got: np.ndarray, want: torch.Tensor) -> float:
    return float(np.abs(got - want.numpy()).max())
