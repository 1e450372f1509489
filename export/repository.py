"""The model repository: numbered versions of one model, as Triton lays them out, written by export.

    REPO/NAME/1/model.onnx     the first version published (and version.json: which run made it, when)
    REPO/NAME/2/model.onnx     the next; a server given --model-repository REPO serves the highest
    REPO/NAME/.retired/3/      a version rolled back: moved aside whole, restorable with --restore 3

A version appears whole or not at all: its folder is written under a hidden temporary name beside the
others (the bytes fsynced, export/files.py) and renamed into place, so a server polling the repository
(serve/ops/repository.py) never sees a folder without its model. Numbers are never reused, retired ones
included: a client that saw version 3 never meets another version 3.

Unlike Triton, the versions of one name need not share an interface: each file carries its own contract
(vocabulary, cell, state size) in its metadata and the server checks each as it loads it. A Triton
repository (--triton-repo) still needs one interface per model name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from export.files import write_atomically

MODEL = "model.onnx"
RECORD = "version.json"  # beside each version's model: the run that made it and its figures
RETIRED = ".retired"


class RepositoryError(Exception):
    """The repository cannot do what was asked (nothing to roll back to, no such retired version)."""


def versions(folder: Path) -> list[int]:
    """The live versions in a model's folder (numbered subfolders holding model.onnx), lowest first."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isascii() and p.name.isdecimal() and (p / MODEL).is_file())


def retired(folder: Path) -> list[int]:
    aside = folder / RETIRED
    if not aside.is_dir():
        return []
    return sorted(int(p.name) for p in aside.iterdir() if p.name.isascii() and p.name.isdecimal())


@dataclass(frozen=True)
class Published:
    version: int | None  # None: the bytes equal the newest version's, nothing was published
    path: Path
    removed: tuple[int, ...] = ()  # versions beyond --keep, deleted


def publish(folder: Path, data: bytes, record: dict[str, str], keep: int = 0) -> Published:
    """DATA as the next version of the model in FOLDER, unless it equals the newest; then keep the newest
    KEEP versions (0 = all). The newest, which an unpinned server serves, is never removed."""
    live = versions(folder)
    if live and (folder / str(live[-1]) / MODEL).read_bytes() == data:
        return Published(None, folder / str(live[-1]) / MODEL)
    number = max(live + retired(folder) + [0]) + 1
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".publishing-"))
    try:
        write_atomically(staging / RECORD, (json.dumps({
            **record, "version": number, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}, indent=1) + "\n").encode())
        write_atomically(staging / MODEL, data)
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; the serving containers read it as another user
        while True:
            try:
                os.rename(staging, folder / str(number))  # whole, or not at all
                break
            except OSError:
                if not (folder / str(number)).exists():
                    raise
                number += 1  # another export took this number first
                _renumber(staging / RECORD, number)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    removed = prune(folder, keep)
    return Published(number, folder / str(number) / MODEL, removed)


def _renumber(record: Path, number: int) -> None:
    data = json.loads(record.read_text())
    data["version"] = number
    write_atomically(record, (json.dumps(data, indent=1) + "\n").encode())


def prune(folder: Path, keep: int) -> tuple[int, ...]:
    """Deletes live versions older than the newest KEEP (0 = keep all)."""
    if keep <= 0:
        return ()
    old = versions(folder)[:-keep]
    for number in old:
        shutil.rmtree(folder / str(number))
    return tuple(old)


def rollback(folder: Path) -> tuple[int, int]:
    """Moves the newest version aside (FOLDER/.retired/N): the one before it becomes the highest, which every
    unpinned server switches to at its next check. Returns (retired, now served)."""
    live = versions(folder)
    if len(live) < 2:
        raise RepositoryError(f"{folder}: {len(live)} version(s); a rollback needs one to fall back to")
    (folder / RETIRED).mkdir(exist_ok=True)
    os.rename(folder / str(live[-1]), folder / RETIRED / str(live[-1]))
    return live[-1], live[-2]


def restore(folder: Path, number: int) -> None:
    """Moves a retired version back; it serves again if it is the highest."""
    source = folder / RETIRED / str(number)
    if not source.is_dir():
        raise RepositoryError(f"{source}: no such retired version (retired: {retired(folder) or 'none'})")
    if (folder / str(number)).exists():
        raise RepositoryError(f"{folder / str(number)} exists already")
    os.rename(source, folder / str(number))


def describe(folder: Path, number: int, where: Path | None = None) -> dict[str, object]:
    """The version's record (version.json), or what the folder shows when it has none (an adopted file)."""
    path = (where or folder / str(number))
    try:
        record: dict[str, object] = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        record = {"version": number}
    if (path / MODEL).is_file():
        record.setdefault("bytes", (path / MODEL).stat().st_size)
    return record


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
