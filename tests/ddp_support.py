"""What the torchrun tests share (tests/train/test_ddp.py, tests/train/test_multinode.py): the tiny run they
train, how far two runs' weights are apart, and which of torchrun's workers has which rank."""

from __future__ import annotations

from pathlib import Path

import torch

from train import checkpoint

STEPS = 120
ARGS = ("--cell", "gru", "--layers", "2", "--hidden", "32", "--batch-size", "4", "--seq-len", "16",
        "--dropout", "0", "--eval-every", "20", "--save-every", "1000", "--log-every", "1", "--steps", str(STEPS))
# max |diff| between the weights of N processes and of one, for the same global batch: float32 sums taken in
# another order (the all-reduce), no more
TOLERANCE = 1e-5


def weights(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(out, checkpoint.LAST)["model_state"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def worker_ranks(launcher: int) -> dict[int, int]:
    """torchrun's workers under the launcher pid, by their RANK: {rank: pid} (read from /proc: the launcher's
    children and their environment; a worker already gone is left out)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children")
    try:
        pids = children.read_text().split()
    except OSError:
        return {}
    ranks = {}
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = int(pid)
    return ranks
