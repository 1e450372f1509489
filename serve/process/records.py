"""The records between the server process and its engine process (serve/process/proxy.py).

Each record is `u32 length, one kind byte, payload` on a pipe. The per-step record (CHARS) is packed
by hand: it is the hot path, one per onnxruntime step call, carrying every row's character. Everything
else is rare and pickled (both ends are this package, started together, same Python).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

# server -> engine
GENERATE, CANCEL, CONSUMED, JOB, STOP = b"G", b"C", b"K", b"J", b"S"
# engine -> server
READY, CHARS, DONE, FAILED, ERROR = b"R", b"T", b"D", b"F", b"E"

_LENGTH = struct.Struct("<I")
_CHARS_HEAD = struct.Struct("<IIII")  # rows, step calls, characters counted, streams cancelled


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _LENGTH.pack(len(payload) + 1) + kind + payload


class Reader:
    """Splits a byte stream into (kind, payload) records; feed it whatever a read returned."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buffer = self._buffer
        buffer += data
        records, at = [], 0
        while len(buffer) - at >= 4:
            (size,) = _LENGTH.unpack_from(buffer, at)
            if len(buffer) - at - 4 < size:
                break
            body = bytes(buffer[at + 4:at + 4 + size])
            records.append((body[:1], body[1:]))
            at += 4 + size
        del buffer[:at]
        return records


def pack_chars(sids: list[int], tokens: np.ndarray, logprobs: np.ndarray, finishes: list[int],
               step_seconds: list[float], batch_sizes: list[int], characters: int, cancelled: int) -> bytes:
    """One step's characters (row i: stream sids[i] got tokens[i]) and the engine's metric updates."""
    rows = len(sids)
    return frame(CHARS, b"".join((
        _CHARS_HEAD.pack(rows, len(step_seconds), characters, cancelled),
        np.asarray(sids, dtype=np.int64).tobytes(), np.asarray(tokens, dtype=np.int64).tobytes(),
        np.asarray(logprobs, dtype=np.float64).tobytes(), np.asarray(finishes, dtype=np.int8).tobytes(),
        np.asarray(step_seconds, dtype=np.float64).tobytes(), np.asarray(batch_sizes, dtype=np.int64).tobytes())))


def unpack_chars(payload: bytes) -> tuple[list[int], list[int], list[float], list[int], list[float], list[int],
                                          int, int]:
    rows, calls, characters, cancelled = _CHARS_HEAD.unpack_from(payload)
    at = _CHARS_HEAD.size

    def take(dtype: Any, count: int) -> list[Any]:
        nonlocal at
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=at)
        at += array.nbytes
        return array.tolist()

    sids, tokens, logprobs, finishes = take(np.int64, rows), take(np.int64, rows), take(np.float64, rows), \
        take(np.int8, rows)
    return sids, tokens, logprobs, finishes, take(np.float64, calls), take(np.int64, calls), characters, cancelled
