"""The two validation protocols, run together at every validation.

carried   the whole validation text in a few contiguous streams, the state carried from window to window:
          what a served model sees when it keeps a stream's state (our `val_loss`, selects checkpoint.pt).
windowed  256-character windows of the validation text, each read from the zero state, the loss averaged
          over every position of every window: the protocol behind nanoGPT's char-level figures.

The windows come as whole tilings of the validation text: tiling s holds the windows starting at s,
s + 256, s + 512, ... Shifts s are a seeded random order of 0..255; at least MIN_TILINGS are read, then
one more at a time until the standard error of the mean over tilings,
SE = sd(tiling means) / sqrt(k) * sqrt((S - k) / (S - 1)) for k of S possible shifts, is <= TARGET_SE
(or every shift has been read, which makes the figure exact). A tiling reads every part of the text once,
so only the placement of window boundaries varies between tilings; random window starts also vary in
which parts of the text they read. On the default corpus (prose and code) random starts needed 6,912
windows, 38 passes over its validation text, to reach SE 0.005; 3 tilings (3 passes) gave 0.0010.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from train.data import chunks, streams
from train.model import CharRNN

WINDOW = 256  # nanoGPT's shakespeare_char block size, so our windowed figure compares with theirs
TARGET_SE = 0.005  # nats/char: finer than the differences between runs we care to tell apart
WINDOWS_PER_BATCH = 256  # windows per forward pass
MIN_TILINGS = 3  # the fewest tiling means a standard error is estimated from
LN2 = math.log(2.0)


class Evaluation(NamedTuple):
    """One validation under both protocols (losses in nats/char)."""

    carried: float
    windowed: float
    windowed_se: float
    windows: int  # windows read
    tilings: int  # whole tilings of the validation text they make up
    window: int  # characters per window (WINDOW, or less for a validation text shorter than that)
    seconds: float

    @property
    def carried_bpc(self) -> float:
        return self.carried / LN2

    @property
    def windowed_bpc(self) -> float:
        return self.windowed / LN2

    def record(self) -> dict:
        return {"val_loss": self.carried, "val_bpc": self.carried_bpc, "val_loss_windowed": self.windowed,
                "val_bpc_windowed": self.windowed_bpc, "windowed_se": self.windowed_se,
                "windows": self.windows, "tilings": self.tilings, "window": self.window, "eval_seconds": round(self.seconds, 3)}


@torch.no_grad()
def carried(model: CharRNN, ids: torch.Tensor, n_streams: int, seq_len: int, device: torch.device) -> float:
    """Mean nats/char over the whole validation text, state carried along each of n_streams streams."""
    n_streams = max(1, min(n_streams, (len(ids) - 1) // 2))
    inputs, targets = streams(ids, n_streams)
    state = model.init_state(n_streams, device)
    total, count = 0.0, 0
    for x, y in chunks(inputs.to(device), targets.to(device), seq_len):
        logits, state = model(x, state)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


@torch.no_grad()
def window_losses(model: CharRNN, ids: torch.Tensor, starts: torch.Tensor, window: int,
                  device: torch.device) -> torch.Tensor:
    """Mean nats/char of each window ids[s : s + window + 1], read from the zero state (float64, on the CPU)."""
    offsets = torch.arange(window + 1)
    out = []
    for first in range(0, len(starts), WINDOWS_PER_BATCH):
        batch = starts[first : first + WINDOWS_PER_BATCH]
        text = ids[batch[:, None] + offsets].to(device)
        logits, _ = model(text[:, :-1], model.init_state(len(batch), device))
        losses = F.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten(), reduction="none")
        out.append(losses.view(len(batch), window).mean(1).double().cpu())
    return torch.cat(out)


@torch.no_grad()
def windowed(model: CharRNN, ids: torch.Tensor, device: torch.device, seed: int, window: int = WINDOW,
             target_se: float = TARGET_SE) -> tuple[float, float, int, int, int]:
    """(mean nats/char, its standard error, windows read, window length, tilings) over zero-state windows."""
    window = min(window, len(ids) - 1)
    n_starts = len(ids) - window  # start s reads ids[s : s + window] and predicts ids[s + 1 : s + window + 1]
    n_shifts = min(window, n_starts)
    shifts = torch.randperm(n_shifts, generator=torch.Generator().manual_seed(seed))
    means, total, windows, se = [], 0.0, 0, math.inf
    for shift in shifts.tolist():
        losses = window_losses(model, ids, torch.arange(shift, n_starts, window), window, device)
        means.append(float(losses.mean()))
        total += float(losses.sum())
        windows += len(losses)
        k = len(means)
        if k == n_shifts:
            se = 0.0  # every tiling read: the mean is exact for this text
            break
        if k >= MIN_TILINGS:
            sd = float(torch.tensor(means, dtype=torch.float64).std())
            se = sd / math.sqrt(k) * math.sqrt((n_shifts - k) / (n_shifts - 1))
            if se <= target_se:
                break
    return total / windows, se, windows, window, len(means)  # every position of every window weighs the same


def evaluate(model: CharRNN, ids: torch.Tensor, n_streams: int, seq_len: int, device: torch.device,
             seed: int, target_se: float = TARGET_SE) -> Evaluation:
    """Both protocols, in eval mode; the model's training mode is restored and no global RNG is used."""
    start = time.monotonic()
    was_training = model.training
    model.eval()
    try:
        loss = carried(model, ids, n_streams, seq_len, device)
        mean, se, n, window, tilings = windowed(model, ids, device, seed, target_se=target_se)
    finally:
        model.train(was_training)
    return Evaluation(loss, mean, se, n, tilings, window, time.monotonic() - start)
