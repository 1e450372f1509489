"""Weight averaging: an exponential moving average (EMA) of the training weights, updated after every
optimizer step. With --ema, the average is what validation judges, checkpoint.pt holds and export writes;
last.pt holds the average as its model_state and the training weights beside it, so --resume is exact.

Averaging the weights of the last phase of training smooths the noise of the final SGD steps (Polyak
averaging; AWD-LSTM's NT-ASGD; Hagele et al. 2024 find EMA a small, steady gain alongside a cooldown).
"""

from __future__ import annotations

import copy

import torch

from train.model import CharRNN

# The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's num_updates form): the
# first weights are random, and a fixed 0.999 would keep a third of them in the average after 400 steps.
RAMP = 10


class Average:
    """The averaged model: a copy of the training model whose parameters follow them with decay."""

    def __init__(self, model: CharRNN, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (RAMP + updates))

    @torch.no_grad()
    def update(self, model: CharRNN, updates: int) -> None:
        """Fold in model's current weights; updates counts the optimizer steps made before this one."""
        weight = 1.0 - self.decay_at(updates)
        for avg, p in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach(), weight)
