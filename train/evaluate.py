"""The two validation protocols, run together at every validation.

carried   the whole validation text in a few contiguous streams, the state carried from window to window:
          what a served model sees when it keeps a stream's state (our `val_loss`, selects checkpoint.pt).
windowed  256-character windows of the validation text, each read from the zero state, the loss averaged
          over every position of every window: the protocol behind nanoGPT's char-level figures.

The windows come as whole tilings of the validation text: tiling s holds the windows starting at s,
s + 256, s + 512, ... read in a seeded order until the standard error over tilings is <= TARGET_SE
(train/protocol.py holds that plan in numpy, so export/evaluate.py repeats it on an ONNX file exactly).
A tiling reads every part of the text once, so only the placement of window boundaries varies between
tilings; random window starts also vary in which parts of the text they read. On the default corpus
(prose and code) random starts needed 6,912 windows, 38 passes over its validation text, to reach SE
0.005; 3 tilings (3 passes) gave 0.0010.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from train.data import chunks, streams
from train.distributed import ONE, World
from train.model import CharRNN
from train.protocol import MIN_TILINGS, TARGET_SE, WINDOW, WINDOWS_PER_BATCH, read_tilings

LN2 = math.log(2.0)
__all__ = ["LN2", "MIN_TILINGS", "TARGET_SE", "WINDOW", "Evaluation", "carried", "evaluate", "windowed"]


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

    def record(self) -> dict[str, Any]:
        return {"val_loss": self.carried, "val_bpc": self.carried_bpc, "val_loss_windowed": self.windowed,
                "val_bpc_windowed": self.windowed_bpc, "windowed_se": self.windowed_se,
                "windows": self.windows, "tilings": self.tilings, "window": self.window,
                "eval_seconds": round(self.seconds, 3)}


@torch.no_grad()
def carried(model: CharRNN, ids: torch.Tensor, n_streams: int, seq_len: int, device: torch.device,
            world: World = ONE) -> float:
    """Mean nats/char over the whole validation text, state carried along each of n_streams streams.
    Under DDP each rank reads its share of the streams and the per-stream sums are all-reduced."""
    n_streams = max(1, min(n_streams, (len(ids) - 1) // 2))
    inputs, targets = streams(ids, n_streams)
    rows = world.share(n_streams)
    sums = torch.zeros(n_streams, dtype=torch.float64, device=device)
    if rows.stop > rows.start:
        state = model.init_state(rows.stop - rows.start, device)
        for x, y in chunks(inputs[rows].to(device), targets[rows].to(device), seq_len):
            logits, state = model(x, state)
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            sums[rows] += losses.view(len(y), -1).sum(1).double()
    return float(world.sum(sums).sum()) / targets.numel()


@torch.no_grad()
def window_losses(model: CharRNN, ids: torch.Tensor, starts: torch.Tensor, window: int,
                  device: torch.device, world: World = ONE) -> torch.Tensor:
    """Mean nats/char of each window ids[s : s + window + 1], read from the zero state (float64, on the CPU).
    Under DDP each rank reads its share of the windows and the means are all-reduced."""
    offsets = torch.arange(window + 1)
    mine = world.share(len(starts))
    out = torch.zeros(len(starts), dtype=torch.float64, device=device)
    for first in range(mine.start, mine.stop, WINDOWS_PER_BATCH):
        last = min(first + WINDOWS_PER_BATCH, mine.stop)
        text = ids[starts[first:last, None] + offsets].to(device)
        logits, _ = model(text[:, :-1], model.init_state(last - first, device))
        losses = F.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten(), reduction="none")
        out[first:last] = losses.view(last - first, window).mean(1).double()
    return world.sum(out).cpu()


def windowed(model: CharRNN, ids: torch.Tensor, device: torch.device, seed: int, window: int = WINDOW,
             target_se: float = TARGET_SE, world: World = ONE) -> tuple[float, float, int, int, int]:
    """(mean nats/char, its standard error, windows read, window length, tilings) over zero-state windows."""
    def read(starts, n):
        return window_losses(model, ids, torch.from_numpy(starts), n, device, world).numpy()

    mean, se, windows, length, tilings = read_tilings(len(ids), seed, read, window, target_se)
    return mean, se, windows, length, tilings


def evaluate(model: CharRNN, ids: torch.Tensor, n_streams: int, seq_len: int, device: torch.device,
             seed: int, target_se: float = TARGET_SE, world: World = ONE) -> Evaluation:
    """Both protocols, in eval mode; the model's training mode is restored and no global RNG is used."""
    start = time.monotonic()
    was_training = model.training
    model.eval()
    try:
        loss = carried(model, ids, n_streams, seq_len, device, world)
        mean, se, n, window, tilings = windowed(model, ids, device, seed, target_se=target_se, world=world)
    finally:
        model.train(was_training)
    return Evaluation(loss, mean, se, n, tilings, window, time.monotonic() - start)
