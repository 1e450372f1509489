"""The checkpoint file: a plain dict of tensors and builtins, loadable with torch.load(weights_only=True).

Two files per run folder. checkpoint.pt holds the best-validation weights and everything export needs
(weights, model config, vocabulary, training summary), so nothing else travels from train to export.
last.pt holds the latest state with what `--resume` needs besides (optimizer, position, carried hidden
state, RNG states). Writes are atomic: a crash mid-save leaves the previous file intact.

Version 2 added last.pt and the windowed validation figures in the summary. Version 3 holds the layers as a
stack of single-layer modules (keys `layers.N.weight_ih_l0` where version 2 had `rnn.weight_ih_lN`; CharRNN
maps the old keys as it loads them, and the parameter order, hence an optimizer state, is unchanged), and
under --ema last.pt's model_state is the averaged weights with the training weights in resume['weights'].
Versions 1 and 2 still load, export and resume.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "charrnn-checkpoint"
VERSION = 3
READABLE = (1, 2, 3)
FILENAME = "checkpoint.pt"  # the best-validation weights, which export reads
LAST = "last.pt"  # the latest state, which --resume reads


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or not one of ours."""


def save(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the export and serve containers run as other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path, name: str = FILENAME) -> dict[str, Any]:
    """Read path (a file, or a run folder's `name`) and check it is a charrnn checkpoint we can read."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (train with `python -m train --out {path.parent}`)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same here
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a charrnn checkpoint")
    if data.get("version") not in READABLE:
        raise CheckpointError(f"{path}: checkpoint version {data.get('version')}, this code reads "
                              f"{', '.join(map(str, READABLE))}")
    for key in ("model_state", "model_config", "vocab", "summary") + (("resume",) if path.name == LAST else ()):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return data
