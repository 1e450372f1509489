"""Writing output files so that a reader never sees half of one.

A running server polls its model file and loads it when it changes (serve/ops/reload.py), so export
may write a new model under a server's feet: the bytes go to a temporary file in the same folder,
reach the disk (fsync), and only then take the name in one rename. A reader opens either the old
file or the new one, whole, never a mix; on a network volume other hosts see the same.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write DATA to PATH through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it, even after a crash
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the serving container reads it as another user
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Makes the rename itself durable; some file systems cannot open a folder for that, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
