"""The two validation protocols, run together at every validation.

carried   the whole validation text in a few contiguous streams, the state carried from window to window:
          what a served model sees when it keeps a stream's state (our `val_loss`, selects checkpoint.pt).
windowed  256-character windows of the validation text, each read from the zero state, the loss averaged
          over every position of every window: the protocol behind nanoGPT's char-level figures. Window
          starts are a seeded random order of every possible start, taken in batches until the standard
          error of the mean is <= TARGET_SE (or every start has been read, which makes it exact).

The standard error treats the windows as a sample without replacement from all possible starts:
SE = sd(window means) / sqrt(n) * sqrt((N - n) / (N - 1)), N the number of starts. Every window has the
same length, so the mean of window means is the mean over every position of every window.
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
WINDOWS_PER_BATCH = 256  # one forward pass; also the fewest windows the SE is estimated from
LN2 = math.log(2.0)


class Evaluation(NamedTuple):
    """One validation under both protocols (losses in nats/char)."""

    carried: float
    windowed: float
    windowed_se: float
    windows: int  # windows read
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
                "windows": self.windows, "window": self.window, "eval_seconds": round(self.seconds, 3)}


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
def windowed(model: CharRNN, ids: torch.Tensor, device: torch.device, seed: int,
             window: int = WINDOW, target_se: float = TARGET_SE) -> tuple[float, float, int, int]:
    """(mean nats/char, its standard error, windows read, window length) over zero-state windows."""
    window = min(window, len(ids) - 1)
    n_starts = len(ids) - window  # start s reads ids[s : s + window] and predicts ids[s + 1 : s + window + 1]
    order = torch.randperm(n_starts, generator=torch.Generator().manual_seed(seed))
    offsets = torch.arange(window + 1)
    means = torch.empty(0, dtype=torch.float64)
    se = math.inf
    for first in range(0, n_starts, WINDOWS_PER_BATCH):
        starts = order[first : first + WINDOWS_PER_BATCH]
        text = ids[starts[:, None] + offsets].to(device)
        logits, _ = model(text[:, :-1], model.init_state(len(starts), device))
        losses = F.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten(), reduction="none")
        means = torch.cat([means, losses.view(len(starts), window).mean(1).double().cpu()])
        n = len(means)
        if n == n_starts:
            se = 0.0  # every start read: the mean is exact for this text
            break
        se = float(means.std() / math.sqrt(n) * math.sqrt((n_starts - n) / (n_starts - 1)))
        if se <= target_se:
            break
    return float(means.mean()), se, len(means), window


def evaluate(model: CharRNN, ids: torch.Tensor, n_streams: int, seq_len: int, device: torch.device,
             seed: int, target_se: float = TARGET_SE) -> Evaluation:
    """Both protocols, in eval mode; the model's training mode is restored and no global RNG is used."""
    start = time.monotonic()
    was_training = model.training
    model.eval()
    try:
        loss = carried(model, ids, n_streams, seq_len, device)
        mean, se, n, window = windowed(model, ids, device, seed, target_se=target_se)
    finally:
        model.train(was_training)
    return Evaluation(loss, mean, se, n, window, time.monotonic() - start)
