"""Where KServe sequences' state lives: the server-held recurrent state of each live `sequence_id`.

A Triton client sends `sequence_id` with `sequence_start` / `sequence_end` and never the state; this
table keeps it between the sequence's requests, in this server process (so a sequence needs connection
affinity behind a balancer: another replica does not know it). What happens at the edges follows
Triton's documents (docs/interop.md lists them):

- START opens a sequence at the zero state; a START for a sequence that is live restarts it at zero
  once the requests already queued for it have run (Triton continues with the new sequence and logs
  the conflict), with a warning in the log.
- A request without START for a sequence that is not live (never started, ended, or idle past
  `idle_seconds`) is refused with InvalidArgument, as Triton refuses it.
- Requests for one sequence run one at a time, in the order they arrived (asyncio.Lock wakes its
  waiters first come, first served), each from the state the one before left, as Triton's sequence
  batcher runs them; requests of different sequences run side by side and batch in the engine.
- END frees the sequence once its request has run. At `max_sequences` live sequences a new START is
  refused with ResourceExhausted, where Triton would queue it in its backlog.
- A sequence belongs to the model it started on (`SequenceModel`: the file's SHA-256 and its zero
  state). After a reload to another model file (serve/ops/reload.py) its next request without START
  is refused with ModelChanged (FAILED_PRECONDITION), which says so and asks for a new START; the
  state it held cannot feed another model. It keeps saying so until a START or its idle expiry.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from serve.errors import InvalidArgument, ModelChanged, ResourceExhausted

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class SequenceControl:
    """A request's sequence parameters: the id (an int or a str, never 0 or ""), START and END."""

    id: int | str
    start: bool = False
    end: bool = False


@dataclass(frozen=True)
class SequenceModel:
    """The model a request runs on: sequences started on another one cannot go on with it."""

    sha256: str
    zero: np.ndarray  # its initial state


@dataclass(eq=False)
class _Sequence:
    key: Hashable
    state: np.ndarray
    last_used: float
    model: str = ""  # SequenceModel.sha256 of the model it started on
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0      # calls holding or waiting for the lock: an idle sweep leaves the sequence alone
    requests: int = 0   # requests that have run since the last START
    closed: bool = False


def _key(sequence_id: int | str) -> Hashable:
    # 7 and "7" are different sequences, as they are in Triton (a string id is not parsed)
    return (type(sequence_id).__name__, sequence_id)


class Sequences:
    """The live sequences, each bound to the model it started on; everything runs on the event loop.
    zero_state: the initial state when requests do not name their model (None: they always do)."""

    def __init__(self, zero_state: np.ndarray | None, max_sequences: int, idle_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._zero = zero_state
        self.max_sequences = max_sequences
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._live: collections.OrderedDict[Hashable, _Sequence] = collections.OrderedDict()  # least recent first

    def __len__(self) -> int:
        self._sweep()
        return len(self._live)

    async def run(self, control: SequenceControl, work: Callable[[np.ndarray], Awaitable[tuple[R, np.ndarray]]],
                  model: str, on: SequenceModel | None = None) -> R:
        """Runs work(state) -> (result, new state) for the sequence's next request, in its turn; keeps
        the new state (frees the sequence at END) and returns the result. `on`: the model the request
        runs on (None: the table's zero state, one model only)."""
        if on is None:
            assert self._zero is not None, "a table without a zero state needs each request's model"
            on = SequenceModel("", self._zero)
        key = _key(control.id)
        while True:
            seq = self._find(key)
            if seq is None:
                if not control.start:
                    raise InvalidArgument(
                        f"inference request for sequence {control.id!r} to model {model!r} must specify "
                        "sequence_start on the first request of the sequence (it was never started, ended, "
                        f"or was idle over {self.idle_seconds:g} s: --sequence-idle-seconds)")
                seq = self._open(key, on)
            seq.users += 1
            try:
                async with seq.lock:
                    if seq.closed:  # it ended or expired while this request waited: look it up again
                        continue
                    if seq.model != on.sha256 and not control.start:
                        raise ModelChanged(
                            f"sequence {control.id!r} for model {model!r} was started on the model file with "
                            f"sha256 {seq.model[:12]}..., and this request runs on {on.sha256[:12]}... (the "
                            "server reloaded its model file): the sequence's state is gone; start it again "
                            "with sequence_start")
                    if control.start:
                        if seq.requests and seq.model == on.sha256:
                            log.warning("sequence %r for model %r was started again while live: it restarts "
                                        "at the zero state (the earlier sequence did not end)", control.id, model)
                        seq.state, seq.requests, seq.model = on.zero, 0, on.sha256
                    try:
                        result, seq.state = await work(seq.state)
                    except BaseException:
                        if not seq.requests:  # a START that never ran leaves no sequence behind
                            self._close(seq)
                        raise
                    seq.requests += 1
                    if control.end:
                        self._close(seq)
                    return result
            finally:
                seq.users -= 1
                seq.last_used = self._clock()

    def _find(self, key: Hashable) -> _Sequence | None:
        self._sweep()
        seq = self._live.get(key)
        if seq is not None:
            self._live.move_to_end(key)
        return seq

    def _open(self, key: Hashable, on: SequenceModel) -> _Sequence:
        if len(self._live) >= self.max_sequences:
            raise ResourceExhausted(
                f"{len(self._live)} sequences are live, the limit is {self.max_sequences} (--max-sequences): "
                f"end one with sequence_end, or wait until idle ones expire ({self.idle_seconds:g} s)")
        seq = _Sequence(key, on.zero, self._clock(), on.sha256)
        self._live[key] = seq
        return seq

    def _close(self, seq: _Sequence) -> None:
        seq.closed = True
        if self._live.get(seq.key) is seq:
            del self._live[seq.key]

    def _sweep(self) -> None:
        """Frees sequences idle over idle_seconds; the least recently used come first, so this stops at
        the first one still fresh (or in use: its last_used is set again when its calls finish)."""
        deadline = self._clock() - self.idle_seconds
        live = self._live
        while live:
            seq = next(iter(live.values()))
            if seq.last_used > deadline or seq.users:
                break
            self._close(seq)
