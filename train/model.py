"""The char-RNN module whose forward pass is exactly the exported ONNX contract.

The recurrent state is batch-first, [batch, num_layers, state_size], in PyTorch as in ONNX, so export wraps
nothing: one stream's state is one contiguous row, which is what a server (or Triton's implicit state) batches.
For LSTM the state row holds h then c, so state_size = 2 * hidden_size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
INPUTS = ("onehot", "embedding")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
            in_size = v
        else:
            self.embed = nn.Embedding(v, config.embed_size)
            in_size = config.embed_size
        self.rnn = CELLS[config.cell](
            in_size,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, v)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        c = self.config
        return torch.zeros(batch, c.num_layers, c.state_size, device=device)

    def forward(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.embedding(ids, self.onehot) if self.embed is None else self.embed(ids)
        layers_first = state.transpose(0, 1)  # nn.RNN* keep layers first; the contract keeps batch first
        if self.config.cell == "lstm":
            h, c = layers_first.chunk(2, dim=2)
            y, (h, c) = self.rnn(x, (h.contiguous(), c.contiguous()))
            new_state = torch.cat([h, c], dim=2)
        else:
            y, new_state = self.rnn(x, layers_first.contiguous())
        return self.head(self.drop(y)), new_state.transpose(0, 1)
