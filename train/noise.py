"""The training-only masks CharRNN.forward takes as its `noise` argument: locked (variational) dropout and
weight-drop (DropConnect on weight_hh), drawn afresh at every step.

They come from a generator seeded by (seed, step), not from the global RNG that `--dropout` uses: so they
repeat after --resume without any saved state, and under DDP every rank draws the masks of the whole global
batch and keeps its own rows, so N processes apply exactly the masks one process would (the weight-drop mask,
one per batch, is the same on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.model import ModelConfig, Noise


@dataclass(frozen=True)
class Rates:
    """Drop probabilities; 0 turns a mask off."""

    input: float = 0.0  # locked, on the embedding: one mask per sequence over its embedding dimensions
    hidden: float = 0.0  # locked, on the input of every layer above the first
    output: float = 0.0  # locked, on the top layer's output before the projection
    weight_hh: float = 0.0  # DropConnect on each layer's recurrent matrix: one mask per batch

    def __post_init__(self) -> None:
        for name in ("input", "hidden", "output", "weight_hh"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"a drop rate must be in [0, 1), got {name} {getattr(self, name)}")

    @property
    def any(self) -> bool:
        return any((self.input, self.hidden, self.output, self.weight_hh))


def step_seed(seed: int, step: int) -> int:
    """One generator seed per (run seed, step), distinct for seeds below 2**31 and steps below 2**32."""
    return ((seed & 0x7FFFFFFF) << 32) | (step & 0xFFFFFFFF)


class Masks:
    """The masks of each step for this process's rows of the global batch."""

    def __init__(self, rates: Rates, model: ModelConfig, batch: int, rows: slice, seed: int,
                 device: torch.device) -> None:
        self.rates, self.model, self.batch, self.rows, self.seed = rates, model, batch, rows, seed
        self.device = device
        self.generator = torch.Generator(device=device)

    def at(self, step: int) -> Noise | None:
        """The masks of training step `step` (0-based), or None when every rate is 0."""
        r, m = self.rates, self.model
        if not r.any:
            return None
        self.generator.manual_seed(step_seed(self.seed, step))
        h = m.hidden_size
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[m.cell]
        return Noise(
            input=self._locked(m.input_size, r.input) if r.input else None,
            hidden=tuple(self._locked(h, r.hidden) for _ in range(m.num_layers - 1)) if r.hidden else (),
            output=self._locked(h, r.output) if r.output else None,
            weight_hh=tuple(self._draw((gates * h, h), r.weight_hh) for _ in range(m.num_layers))
            if r.weight_hh else (),
        )

    def _locked(self, features: int, p: float) -> torch.Tensor:
        """[rows, 1, features]: drawn for the whole global batch, so a rank's rows match one process's."""
        return self._draw((self.batch, 1, features), p)[self.rows]

    def _draw(self, shape: tuple[int, ...], p: float) -> torch.Tensor:
        keep = 1.0 - p
        mask = torch.empty(shape, device=self.device).bernoulli_(keep, generator=self.generator)
        return mask.div_(keep)  # inverted dropout: the expected activation is unchanged, evaluation scales nothing
