"""Checkpoint -> ONNX graph with the contract's names, symbolic batch/seq, and metadata_props.

Exporter choice (pinned, and tested by tests/export): torch.onnx.export(dynamo=False), the TorchScript
exporter. In torch 2.13 the default dynamo exporter freezes nn.RNN's sequence length into the graph, writes
weights to a side .onnx.data file, and may stamp the example's sequence length on the outputs; the
TorchScript path emits the ONNX RNN/GRU/LSTM operators with fully dynamic batch and seq, in one file.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any

import onnx
import torch

from export.contract import BATCH, HIDDEN, INPUTS, OUTPUTS, SEQ
from train.model import CharRNN, ModelConfig

OPSET = 17  # the ONNX RNN/GRU/LSTM ops and every runtime we target (onnxruntime >= 1.11, Triton) agree here


class _Traced(CharRNN):
    """CharRNN whose forward is trace (logits, state and `hidden`): what the exporter traces. A subclass,
    not a wrapper module, so that the graph's initializers keep the model's own names (head.bias...)."""

    def forward(self, ids: torch.Tensor, state: torch.Tensor,  # type: ignore[override]  # one output more
                noise: object = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.trace(ids, state)


def _traced(model: CharRNN) -> _Traced:
    """The same module (its parameters, buffers and config, shared, not copied) as a _Traced."""
    traced: Any = copy.copy(model)
    traced.__class__ = _Traced
    result: _Traced = traced
    return result


class ExportError(Exception):
    """The exporter could not turn a model that rebuilt fine into an ONNX file."""


def rebuild(ckpt: dict[str, Any]) -> CharRNN:
    model = CharRNN(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.eval()


def to_onnx(model: CharRNN, vocab: list[str], provenance: dict[str, str]) -> onnx.ModelProto:
    """The ONNX graph with the contract's metadata; ExportError says what failed, in one line."""
    try:
        return _to_onnx(model, vocab, provenance)
    except Exception as exc:  # torch.onnx and protobuf raise many unrelated types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"{type(exc).__name__}: {first}" if first else type(exc).__name__) from exc


def _to_onnx(model: CharRNN, vocab: list[str], provenance: dict[str, str]) -> onnx.ModelProto:
    cfg = model.config
    ids = torch.zeros(2, 3, dtype=torch.long)  # batch != seq so no dim can be confused with the other
    state = model.init_state(2)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which is wrong for us (see above).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        # nn.RNN's Python-side shape assertions trace as constants; they check shapes, not data flow.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]  # absent from torch.jit.__all__
        warnings.filterwarnings("ignore", message=".*Exporting a model to ONNX with a batch_size other.*")
        torch.onnx.export(
            _traced(model), (ids, state), buffer, dynamo=False, opset_version=OPSET,  # type: ignore[arg-type]  # f may be a file object (TorchScript exporter)
            input_names=list(INPUTS), output_names=[*OUTPUTS, HIDDEN],
            dynamic_axes={"input_ids": {0: BATCH, 1: SEQ}, "state_in": {0: BATCH},
                          "logits": {0: BATCH, 1: SEQ}, "state_out": {0: BATCH}, HIDDEN: {0: BATCH, 1: SEQ}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {
        "vocab": json.dumps(vocab, ensure_ascii=False),
        "cell": cfg.cell,
        "num_layers": str(cfg.num_layers),
        "hidden_size": str(cfg.hidden_size),
        "state_size": str(cfg.state_size),
        "producer": "charrnn",
        "torch_version": str(torch.__version__),
        **provenance,
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "charrnn"
    proto.doc_string = "charrnn char-level RNN; recurrent state is the explicit state_in/state_out pair"
    return proto


def provenance_of(summary: dict[str, Any], ended_at: str) -> dict[str, str]:
    """ended_at: when training saved these weights (never the clock now: the same checkpoint exports the same
    bytes, so a server watching the file sees nothing new). val_loss is the carried-state protocol;
    val_loss_windowed the 256-char windows (empty for checkpoints of format version 1, which predate it,
    and for runs without a validation split)."""

    def nats(key: str) -> str:
        value = summary.get(key)
        return "" if value is None else f"{value:.6f}"

    return {
        "corpus": str(summary.get("corpus", "")),
        "steps": str(summary.get("steps", "")),
        "chars_seen": str(summary.get("chars_seen", "")),
        "val_loss": nats("best_val_loss"),
        "val_loss_windowed": nats("best_val_loss_windowed"),
        "train_seconds": str(summary.get("seconds", "")),
        "exported_at": ended_at,
    }
