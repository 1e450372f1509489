"""A Triton model repository for model.onnx: REPO/NAME/config.pbtxt beside REPO/NAME/1/model.onnx.

    python -m export runs/demo --triton-repo models       # then: tritonserver --model-repository=models

Triton serves the file with its onnxruntime backend, and its sequence batcher holds each sequence's
state ("implicit state", Triton's user guide: implicit_state_management.md): the state_in of a request
is the state_out of the sequence's previous request, zeros at the sequence's start. A client sends only
input_ids, with the sequence_id / sequence_start / sequence_end parameters. The model needs no control
inputs (START, READY, END, CORRID): the state is its only recurrence, and the zero initial state is all
that a start means to it. state_out is also listed as an output, the way that document says a client
may ask for the state (the onnxruntime backend then returns it as well as keeping it). A file with the
optional `hidden` output (every layer's h after every character) lists it too, for a client that asks.

The configuration is a function of the model's name, the sizes in the file's metadata_props and whether
its graph has `hidden` (export/contract.py), so anything that has the file, a server too, can rebuild
it. It is written by hand in protobuf text format; the suite parses it with the ModelConfig message
tritonclient ships and checks each field against the ONNX graph. No Triton can run on our machines, so
nothing here proves that Triton loads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from export.contract import HIDDEN, INPUTS, OUTPUTS
from export.files import write_atomically

VERSION = "1"  # the one version directory; charrnn's server reports the same version
PLATFORM = "onnxruntime_onnx"
MAX_BATCH_SIZE = 256  # the charrnn server's --max-batch default: rows in one model call
IDLE_SECONDS = 60  # a sequence idle this long is freed; Triton's default (1 s) ends one within a person's pause
MAX_CANDIDATE_SEQUENCES = 1024  # live sequences an instance batches from: the server's --max-streams default
MAX_QUEUE_DELAY_US = 200  # how long a batch may wait to fill: the server's --max-delay-us default
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a directory name Triton accepts, no path tricks

IDS, STATE_IN = INPUTS
LOGITS, STATE_OUT = OUTPUTS


@dataclass(frozen=True)
class TritonModel:
    """What config.pbtxt says about one model: its name and the contract's sizes."""

    name: str
    vocab_size: int
    num_layers: int
    state_size: int
    hidden_size: int = 0  # of the `hidden` output; 0: the file has none (exported before it existed)

    @classmethod
    def of(cls, meta: Mapping[str, str], name: str, outputs: Iterable[str] = ()) -> TritonModel:
        """From the file's metadata_props (as onnx or onnxruntime's custom_metadata_map gives them) and the
        names of its graph outputs (only whether `hidden` is among them matters)."""
        hidden = int(meta["hidden_size"]) if HIDDEN in outputs else 0
        return cls(name=name, vocab_size=len(json.loads(meta["vocab"])), num_layers=int(meta["num_layers"]),
                   state_size=int(meta["state_size"]), hidden_size=hidden)


def check_name(name: str) -> str:
    """NAME if Triton can use it as the model's directory and name; ValueError saying why not otherwise."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"model name {name!r} must be letters, digits, '_', '.' or '-', not starting with '.' "
                         "or '-' (it names the model's directory in the repository)")
    return name


def _dims(values: list[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def config_pbtxt(model: TritonModel) -> str:
    """config.pbtxt for MODEL: dims exclude the batch dimension, -1 is the variable sequence length."""
    state = _dims([model.num_layers, model.state_size])
    hidden = "" if not model.hidden_size else f''',
  {{
    name: "{HIDDEN}"
    data_type: TYPE_FP32
    dims: {_dims([-1, model.num_layers, model.hidden_size])}
  }}'''
    return f'''\
# Triton model configuration for charrnn's model.onnx, written by `python -m export --triton-repo`.
# Triton keeps {STATE_IN}/{STATE_OUT} per sequence (implicit state, zeros at the start): send only
# {IDS}, with the sequence_id, sequence_start and sequence_end parameters.
name: "{model.name}"
platform: "{PLATFORM}"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{
    name: "{IDS}"
    data_type: TYPE_INT64
    dims: {_dims([-1])}
  }}
]
output [
  {{
    name: "{LOGITS}"
    data_type: TYPE_FP32
    dims: {_dims([-1, model.vocab_size])}
  }},
  {{
    name: "{STATE_OUT}"
    data_type: TYPE_FP32
    dims: {state}
  }}{hidden}
]
sequence_batching {{
  max_sequence_idle_microseconds: {IDLE_SECONDS * 1_000_000}
  oldest {{
    max_candidate_sequences: {MAX_CANDIDATE_SEQUENCES}
    max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
  }}
  state [
    {{
      input_name: "{STATE_IN}"
      output_name: "{STATE_OUT}"
      data_type: TYPE_FP32
      dims: {state}
      initial_state {{
        name: "zero"
        data_type: TYPE_FP32
        dims: {state}
        zero_data: true
      }}
    }}
  ]
}}
'''


def write_repository(repo: Path, model: TritonModel, onnx_bytes: bytes) -> tuple[Path, Path]:
    """Write REPO/NAME/1/model.onnx and REPO/NAME/config.pbtxt; return their paths (config first)."""
    folder = repo / check_name(model.name)
    onnx_path = folder / VERSION / "model.onnx"
    config_path = folder / "config.pbtxt"
    write_atomically(onnx_path, onnx_bytes)
    write_atomically(config_path, config_pbtxt(model).encode("utf-8"))
    return config_path, onnx_path
