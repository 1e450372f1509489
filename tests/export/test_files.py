"""export/files.py: a reader of the output path sees the old file or the new one, whole, never half."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from export.files import write_atomically

SIZE = 4 << 20  # large enough that a plain write is seen half done by a reader polling the file


def test_a_reader_never_sees_half_a_file(tmp_path: Path):
    path = tmp_path / "model.onnx"
    payloads = (b"a" * SIZE, b"b" * (SIZE + 4096))
    write_atomically(path, payloads[0])
    seen: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            data = path.read_bytes()
            if data not in payloads:
                seen.append(data[:16] + b"..." + str(len(data)).encode())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            write_atomically(path, payloads[i % 2])
    finally:
        done.set()
        reader.join()
    assert not seen, f"the reader saw {len(seen)} partial files, e.g. {seen[0]!r}"
    assert path.read_bytes() == payloads[1]
    assert os.listdir(tmp_path) == ["model.onnx"], "no temporary file is left behind"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "readable by the serving user"


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path):
    path = tmp_path / "model.onnx"
    write_atomically(path, b"old model")
    with pytest.raises(TypeError):
        write_atomically(path, "not bytes")  # type: ignore[arg-type]  # the wrong type, on purpose
    assert path.read_bytes() == b"old model"
    assert os.listdir(tmp_path) == ["model.onnx"]
