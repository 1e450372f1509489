"""The windowed protocol's sampling plan, in numpy alone: train/evaluate.py (PyTorch) and export/evaluate.py
(onnxruntime) both read windows through `read_tilings`, so the two compute the same figure by construction.

Tiling s holds the windows starting at s, s + window, s + 2 * window, ... Shifts come in a seeded random order
of 0..window-1 (numpy's PCG64, so no framework's generator is needed to repeat it); at least MIN_TILINGS are
read, then one more at a time until SE = sd(tiling means) / sqrt(k) * sqrt((S - k) / (S - 1)) for k of S
possible shifts is <= target_se (or every shift has been read, which makes the figure exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

WINDOW = 256  # nanoGPT's shakespeare_char block size, so our windowed figure compares with theirs
TARGET_SE = 0.005  # nats/char: finer than the differences between runs we care to tell apart
WINDOWS_PER_BATCH = 256  # windows per forward pass
MIN_TILINGS = 3  # the fewest tiling means a standard error is estimated from
CARRIED_STREAMS = 8  # the carried protocol's contiguous streams (TrainConfig.val_streams)


class Windowed(NamedTuple):
    mean: float  # nats/char over every position of every window read
    se: float
    windows: int
    window: int
    tilings: int


def shift_order(n_shifts: int, seed: int) -> list[int]:
    """The order in which tilings are read: a permutation of range(n_shifts), fixed by seed."""
    return [int(s) for s in np.random.default_rng(seed).permutation(n_shifts)]


def read_tilings(n_ids: int, seed: int, window_losses: Callable[[np.ndarray, int], np.ndarray],
                 window: int = WINDOW, target_se: float = TARGET_SE) -> Windowed:
    """Drive window_losses(starts, window) -> mean nats/char per window over seeded tilings of n_ids ids."""
    window = min(window, n_ids - 1)
    n_starts = n_ids - window  # start s reads ids[s : s + window] and predicts ids[s + 1 : s + window + 1]
    n_shifts = min(window, n_starts)
    means: list[float] = []
    total, windows, se = 0.0, 0, math.inf
    for shift in shift_order(n_shifts, seed):
        losses = np.asarray(window_losses(np.arange(shift, n_starts, window), window), dtype=np.float64)
        means.append(float(losses.mean()))
        total += float(losses.sum())
        windows += len(losses)
        k = len(means)
        if k == n_shifts:
            se = 0.0  # every tiling read: the mean is exact for this text
            break
        if k >= MIN_TILINGS:
            se = float(np.std(means, ddof=1)) / math.sqrt(k) * math.sqrt((n_shifts - k) / (n_shifts - 1))
            if se <= target_se:
                break
    return Windowed(total / windows, se, windows, window, len(means))  # every position weighs the same


def stream_length(n_ids: int, n_streams: int) -> tuple[int, int]:
    """(streams, characters per stream) of the carried protocol: as many as n_streams, each >= 2 long."""
    n_streams = max(1, min(n_streams, (n_ids - 1) // 2))
    return n_streams, (n_ids - 1) // n_streams
