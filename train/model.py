"""The char-RNN module whose forward pass is exactly the exported ONNX contract.

The recurrent state is batch-first, [batch, num_layers, state_size], in PyTorch as in ONNX, so export wraps
nothing: one stream's state is one contiguous row, which is what a server (or Triton's implicit state) batches.
For LSTM the state row holds h then c, so state_size = 2 * hidden_size.

The layers are a stack of single-layer nn.GRU/nn.LSTM/nn.RNN modules, not one multi-layer module: locked
dropout needs a mask of its own between layers (nn.GRU's inter-layer dropout draws a new one at every time
step), and each layer's per-character output is then at hand. On the CPU the stack computes bit for bit what
the multi-layer module did (same kernels, same dropout draws, same parameter order, so an optimizer state
saved by it still fits); checkpoints written with its keys (`rnn.weight_ih_l1`) load through a key mapping.
Export writes one ONNX GRU/LSTM/RNN operator per layer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
INPUTS = ("onehot", "embedding")
# A key of the multi-layer module this stack replaced: rnn.weight_ih_l1 -> layers.1.weight_ih_l0.
_OLD_KEY = re.compile(r"^rnn\.(weight|bias)_(ih|hh)_l(\d+)$")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: str = "gru"  # GRU: close to LSTM quality at 3/4 of its cost per step
    num_layers: int = 2
    hidden_size: int = 256
    input: str = "embedding"  # learned embedding; 'onehot' is the seed lesson's fixed identity input
    embed_size: int = 64  # characters need few dimensions; ignored for onehot (= vocab_size)
    dropout: float = 0.0  # between stacked layers and before the projection; 0 for short budgets

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {list(INPUTS)}, got {self.input!r}")
        for name in ("vocab_size", "num_layers", "hidden_size", "embed_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def state_size(self) -> int:
        return 2 * self.hidden_size if self.cell == "lstm" else self.hidden_size

    @property
    def input_size(self) -> int:
        return self.vocab_size if self.input == "onehot" else self.embed_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Noise(NamedTuple):
    """The training-only masks of one step (train/noise.py draws them), already scaled by 1 / (1 - p).

    Locked masks are [batch, 1, features]: one per sequence, the same at every time step. Weight masks are
    the shape of a layer's weight_hh: one per batch, shared by every sequence and time step. An empty
    tuple or None means that mask is off."""

    input: torch.Tensor | None  # on the embedding (or one-hot) input
    hidden: tuple[torch.Tensor, ...]  # between layers: num_layers - 1 masks, or ()
    output: torch.Tensor | None  # on the top layer's output, before the projection
    weight_hh: tuple[torch.Tensor, ...]  # DropConnect on each layer's recurrent matrix: num_layers, or ()


def stack_key(key: str) -> str:
    """The stack's name for a key of the multi-layer module (checkpoints before the stack); others as given."""
    old = _OLD_KEY.match(key)
    return f"layers.{old[3]}.{old[1]}_{old[2]}_l0" if old else key


class CharRNN(nn.Module):
    """ids [B, T] int64, state [B, L, S] float32 -> logits [B, T, V], state [B, L, S]."""

    onehot: torch.Tensor  # a buffer (register_buffer below), present only for one-hot input

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        v = config.vocab_size
        if config.input == "onehot":
            # A frozen identity table: one-hot input as a lookup, which exports as a plain Gather.
            self.register_buffer("onehot", torch.eye(v), persistent=False)
            self.embed = None
        else:
            self.embed = nn.Embedding(v, config.embed_size)
        cell = CELLS[config.cell]
        self.layers = nn.ModuleList(
            cell(config.input_size if i == 0 else config.hidden_size, config.hidden_size, batch_first=True)
            for i in range(config.num_layers))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, v)
        self.register_load_state_dict_pre_hook(_upgrade_keys)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        c = self.config
        return torch.zeros(batch, c.num_layers, c.state_size, device=device)

    def set_forget_bias(self, value: float) -> None:
        """LSTM only: every layer's forget-gate bias starts at value (Jozefowicz et al. 2015 use 1), so the
        cell remembers by default early in training. PyTorch adds two biases; bias_ih takes it, bias_hh 0."""
        if self.config.cell != "lstm":
            raise ValueError(f"a forget-gate bias exists in LSTM only, not {self.config.cell}")
        h = self.config.hidden_size
        with torch.no_grad():
            for layer in self.layers:  # gate order i, f, g, o: the forget gate is the second quarter
                layer.get_parameter("bias_ih_l0")[h : 2 * h] = value
                layer.get_parameter("bias_hh_l0")[h : 2 * h] = 0.0

    def forward(self, ids: torch.Tensor, state: torch.Tensor,
                noise: Noise | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits, state_out, _ = self._run(ids, state, noise)
        return logits, state_out

    def trace(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward's logits and state, and `hidden` [B, T, L, H]: every layer's h after every input id (for
        LSTM the h half), what export writes as the graph's third output and the playground draws."""
        logits, state_out, outputs = self._run(ids, state, None)
        return logits, state_out, torch.stack(outputs, dim=2)

    def _run(self, ids: torch.Tensor, state: torch.Tensor,
             noise: Noise | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if state.dim() != 3 or state.shape[1] != len(self.layers):
            # the multi-layer module refused such a state itself; a stack would quietly read only its layers
            raise RuntimeError(f"Expected hidden state [batch, {len(self.layers)}, {self.config.state_size}], "
                               f"got {list(state.shape)}")
        x = F.embedding(ids, self.onehot) if self.embed is None else self.embed(ids)
        if noise is not None and noise.input is not None:
            x = x * noise.input
        lstm = self.config.cell == "lstm"
        states, outputs = [], []
        for i, layer in enumerate(self.layers):
            if i > 0:
                # --dropout between layers, as nn.GRU's own did it: a new mask per element and time step
                x = F.dropout(x, self.config.dropout, self.training) if self.config.dropout else x
                if noise is not None and noise.hidden:
                    x = x * noise.hidden[i - 1]
            s = state[:, i].unsqueeze(0)  # [1, B, S]: a single-layer module keeps its one layer first
            carried: Any = tuple(part.contiguous() for part in s.chunk(2, dim=2)) if lstm else s.contiguous()
            if noise is not None and noise.weight_hh:
                # DropConnect through functional_call: the fused kernel runs on masked weights, and the
                # gradient reaches the plain parameter through the product
                masked = {"weight_hh_l0": layer.get_parameter("weight_hh_l0") * noise.weight_hh[i]}
                x, carried = functional_call(layer, masked, (x, carried))
            else:
                x, carried = layer(x, carried)
            states.append(torch.cat(carried, dim=2) if lstm else carried)
            outputs.append(x)  # [B, T, H]: this layer's h at every step, before the next layer's dropout
        x = self.drop(x)
        if noise is not None and noise.output is not None:
            x = x * noise.output
        return self.head(x), torch.cat(states, dim=0).transpose(0, 1), outputs


def _upgrade_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict's pre-hook: old multi-layer keys under prefix become the stack's, in place (the
    dict is load_state_dict's own copy)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + stack_key(key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)
