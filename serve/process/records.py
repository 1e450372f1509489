"""Every record between the server process and its engine process, and the one place they are encoded
and decoded.

On the pipe each record is `u32 length, one kind byte, payload`. `Chars`, one per onnxruntime step
call carrying every row's character, is the hot path and is packed by hand; every other record is rare
and pickled as a tuple of its fields (both ends are this package, started together, same Python).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, NamedTuple

import numpy as np

from serve.engine.protocol import SamplingParams
from serve.engine.runtime import ModelSpec
from serve.errors import DeviceError, EngineFailure, ModelError, ServeError, Unavailable


# ---- server -> engine ----------------------------------------------------------------------------
class Model(NamedTuple):
    """The first record an engine process reads: the model file's bytes, as the server read them at
    start (its payload is the bytes themselves, not pickled)."""

    data: bytes


class Generate(NamedTuple):
    stream: int
    prompt: np.ndarray
    params: SamplingParams  # with the seed decided by the server, so that both ends agree on it
    max_chars: int
    stops: tuple[str, ...]


class Consumed(NamedTuple):
    """How far a stream's consumer has read (the engine parks streams a window ahead of it)."""

    stream: int
    consumed: int


class Cancel(NamedTuple):
    stream: int


class Predict(NamedTuple):
    """A Predict/Step job: feed ids from state (None = zero state); last_only: answer with the last
    row of logits only (Step); hidden: answer with the model's hidden output too (a trace)."""

    job: int
    ids: np.ndarray
    state: np.ndarray | None
    last_only: bool
    hidden: bool = False


class Drop(NamedTuple):
    """The job's caller has gone: do not compute it, if it has not been computed yet."""

    job: int


class Stop(NamedTuple):
    reason: str


# ---- engine -> server ----------------------------------------------------------------------------
class Ready(NamedTuple):
    provider: str
    spec: ModelSpec


class Chars(NamedTuple):
    """One step's characters (row i: stream streams[i] got tokens[i]) and the engine's metric updates:
    the prompt cache's counts since the last record, and the bytes it holds (-1: no news). Encoded from the
    step's arrays as they are; decoded into lists. The rows that asked for alternatives (OpenAI's logprobs)
    have them in alternative_rows (indices into the rows) with their token ids and log-probabilities [m, K];
    they are empty for everyone else, which costs the hot path two zeros."""

    streams: list[int]
    tokens: list[int]
    logprobs: list[float] | np.ndarray
    finishes: list[int]
    step_seconds: list[float]
    batch_sizes: list[int]
    characters: int
    cancelled: int
    cache_hits: int = 0
    cache_misses: int = 0
    cache_saved: int = 0
    cache_evictions: int = 0
    cache_bytes: int = -1
    alternative_rows: list[int] | np.ndarray = np.empty(0, dtype=np.int64)
    alternative_ids: np.ndarray = np.empty((0, 0), dtype=np.int64)
    alternative_logprobs: np.ndarray = np.empty((0, 0), dtype=np.float64)


class Done(NamedTuple):
    job: int
    logits: np.ndarray
    state: np.ndarray
    hidden: np.ndarray | None = None  # a trace's [T, num_layers, hidden_size]


class Failure(NamedTuple):
    """An exception as it crosses the pipe: its class name and constructor arguments."""

    name: str
    args: tuple[str, ...]

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        if isinstance(error, ModelError):
            return cls(type(error).__name__, (str(error.path), error.problem))
        return cls(type(error).__name__, (str(error),))

    def exception(self) -> ServeError:
        """The server-side exception; an unknown class becomes EngineFailure with the same words."""
        kind = _ERRORS.get(self.name, EngineFailure)
        try:
            return kind(*self.args)
        except TypeError:
            return EngineFailure(": ".join(self.args))


class Failed(NamedTuple):
    streams: list[int]
    jobs: list[int]
    error: Failure


class StartFailed(NamedTuple):
    """The engine process could not load the model or the device; it exits after this."""

    error: Failure


Record = Model | Generate | Consumed | Cancel | Predict | Drop | Stop | Ready | Chars | Done | Failed | StartFailed

_ERRORS: dict[str, type[ServeError]] = {cls.__name__: cls for cls in (EngineFailure, Unavailable, ModelError,
                                                                       DeviceError)}
_KIND: dict[type, bytes] = {
    Model: b"M", Generate: b"G", Cancel: b"C", Consumed: b"K", Predict: b"J", Drop: b"X", Stop: b"S",  # to the engine
    Ready: b"R", Chars: b"T", Done: b"D", Failed: b"F", StartFailed: b"E",                              # from it
}
_TYPE = {kind: cls for cls, kind in _KIND.items()}
_CHARS, _MODEL = _KIND[Chars], _KIND[Model]
_LENGTH = struct.Struct("<I")
# rows, step calls, characters counted, streams cancelled; the prompt cache's hits, misses, characters
# saved, evictions, bytes held; the alternatives' m and K
_CHARS_HEAD = struct.Struct("<IIIIIIQIqII")


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload) + 1) + kind + payload


def encode(record: Record) -> bytes:
    if type(record) is Chars:
        return _frame(_CHARS, _encode_chars(record))
    if type(record) is Model:
        return _frame(_MODEL, record.data)
    return _frame(_KIND[type(record)], pickle.dumps(tuple(record), protocol=pickle.HIGHEST_PROTOCOL))


def _body(rows: int, calls: int) -> str:
    """The struct format of a Chars record's arrays: streams, tokens (int64), log-probabilities (float64),
    finishes (int8) per row; step seconds (float64), batch sizes (int64) per step call. One struct call
    packs or unpacks them all: a step of one stream ships one record per character, where numpy's per-array
    cost (a dozen arrays each way) took longer than the bytes."""
    return f"<{rows}q{rows}q{rows}d{rows}b{calls}d{calls}q"


def _encode_chars(r: Chars) -> bytes:
    m, width = r.alternative_ids.shape if len(r.alternative_rows) else (0, 0)
    rows, calls = len(r.streams), len(r.step_seconds)
    logprobs = r.logprobs.tolist() if isinstance(r.logprobs, np.ndarray) else r.logprobs
    parts = [_CHARS_HEAD.pack(rows, calls, r.characters, r.cancelled, r.cache_hits, r.cache_misses, r.cache_saved,
                              r.cache_evictions, r.cache_bytes, m, width),
             struct.pack(_body(rows, calls), *r.streams, *r.tokens, *logprobs, *r.finishes, *r.step_seconds,
                         *r.batch_sizes)]
    if m:
        parts += (np.asarray(r.alternative_rows, dtype=np.int64).tobytes(),
                  np.ascontiguousarray(r.alternative_ids, dtype=np.int64).tobytes(),
                  np.ascontiguousarray(r.alternative_logprobs, dtype=np.float64).tobytes())
    return b"".join(parts)


def _decode_chars(payload: bytes) -> Chars:
    rows, calls, characters, cancelled, *cache, m, width = _CHARS_HEAD.unpack_from(payload)
    body = _body(rows, calls)
    values = struct.unpack_from(body, payload, _CHARS_HEAD.size)
    cut = (0, rows, 2 * rows, 3 * rows, 4 * rows, 4 * rows + calls, 4 * rows + 2 * calls)
    streams, tokens, logprobs, finishes, seconds, sizes = (list(values[cut[i]:cut[i + 1]]) for i in range(6))
    chars = Chars(streams, tokens, logprobs, finishes, seconds, sizes, characters, cancelled, *cache)
    if not m:
        return chars
    at = _CHARS_HEAD.size + struct.calcsize(body)

    def array(dtype: Any, count: int) -> np.ndarray:
        nonlocal at
        values = np.frombuffer(payload, dtype=dtype, count=count, offset=at)
        at += values.nbytes
        return values

    return chars._replace(alternative_rows=array(np.int64, m).tolist(),
                          alternative_ids=array(np.int64, m * width).reshape(m, width),
                          alternative_logprobs=array(np.float64, m * width).reshape(m, width))


def _decode(kind: bytes, payload: bytes) -> Record:
    if kind == _CHARS:
        return _decode_chars(payload)
    if kind == _MODEL:
        return Model(payload)
    record: Record = _TYPE[kind](*pickle.loads(payload))
    return record


class Reader:
    """Splits a byte stream into records; feed it whatever a read returned."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        buffer = self._buffer
        buffer += data
        records, at = [], 0
        while len(buffer) - at >= 4:
            (size,) = _LENGTH.unpack_from(buffer, at)
            if len(buffer) - at - 4 < size:
                break
            body = bytes(buffer[at + 4:at + 4 + size])
            records.append(_decode(body[:1], body[1:]))
            at += 4 + size
        del buffer[:at]
        return records
