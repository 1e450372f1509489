"""The units of work inside an engine: a Generate `Stream` and a Predict/Step `Job`.

Where the state lives: a stream's recurrent state sits in a row of its step batch's device state
(serve/engine/scheduler.py) while it is being stepped, and in `Stream.state` (host) only while it
waits outside a batch. A job carries its own host state in and out.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serve.engine.protocol import Finish, SamplingParams

Item = tuple[int, float, Finish]  # one character: (token id, log-probability, finish)
Alternative = tuple[list[int], list[float]]  # the most likely token ids at one position, their log-probabilities


class Reader(Protocol):
    """Who else hears of a stream's consumer: the process proxy, which tells the engine process how far
    the consumer has read (it parks streams a window ahead) and when it went away."""

    report_every: int

    def progress(self, stream: Stream) -> None: ...

    def closed(self, stream: Stream) -> None: ...


class Stream:
    """One Generate request inside the engine. On the loop: `pop()` the next (token, logprob, finish),
    `await wait()` when there is none yet, or simply iterate it.

    The engine `push`es straight into a deque (append and popleft are atomic) and wakes the loop only
    for streams whose consumer is waiting, so a consumer that keeps up with a faster engine costs no
    cross-thread call at all. Loop side: `consumed`, `cancelled`, `failure`, the waiter and the popping
    end of the deque; engine side: everything else.
    """

    def __init__(self, prompt: np.ndarray, params: SamplingParams, max_chars: int, stops: Sequence[str],
                 vocab: Sequence[str], key: int = 0, reader: Reader | None = None) -> None:
        self.prompt = prompt
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.generator = np.random.default_rng(self.seed)
        self.max_chars = max_chars
        self.stops = tuple(stops)
        self.key = key  # the stream's id between the server and an engine process
        self._stop_len = max((len(s) for s in self.stops), default=0)
        self._vocab = vocab
        self._reader = reader
        self.tail = ""
        self._items: collections.deque[Item] = collections.deque()
        # With params.alternatives: one entry per character, appended before the character itself, so that
        # whoever pops a character finds its alternatives here (popleft one per character).
        self.alternatives: collections.deque[Alternative] | None = (
            collections.deque() if params.alternatives else None)
        self._waiter: asyncio.Future[None] | None = None
        self.produced = 0
        self.consumed = 0
        self.cancelled = False
        self.failure: BaseException | None = None  # loop side: set when the engine fails the stream
        self.parked = False  # engine side: sitting out until the consumer catches up
        self.done = False
        self.token = -1
        self.state: np.ndarray | None = None
        self._ended = False  # loop side: the last item has been handed out

    def emitted(self, token: int) -> Finish:
        """Engine side: records one produced token and says whether the stream ends with it."""
        self.produced += 1
        self.token = token
        finish = Finish.NONE
        if self._stop_len:
            self.tail = (self.tail + self._vocab[token])[-self._stop_len:]
            if any(self.tail.endswith(s) for s in self.stops):
                finish = Finish.STOP
        if not finish and self.produced >= self.max_chars:
            finish = Finish.LENGTH
        self.done = bool(finish)
        return finish

    def close(self) -> None:
        """Loop side: the consumer is gone; the engine drops the stream at its next step."""
        if not self.cancelled:
            self.cancelled = True
            if self._reader is not None:
                self._reader.closed(self)

    def pop(self) -> Item | None:
        """Loop side: the next character, None if the engine has not produced it yet. Raises the
        stream's failure, which overtakes the characters still queued."""
        if self.failure is not None:
            self._ended = True
            raise self.failure
        try:
            item = self._items.popleft()
        except IndexError:
            return None
        self.consumed += 1
        reader = self._reader
        if reader is not None and not self.consumed % reader.report_every:
            reader.progress(self)
        return item

    async def wait(self) -> None:
        """Loop side: returns once `pop()` has something (a character or the failure) to hand out."""
        if self._waiter is not None:
            raise RuntimeError("a Stream has one consumer")
        loop = asyncio.get_running_loop()
        # A wake can arrive for an earlier wait whose characters were already taken: look again each time.
        while not self._items and self.failure is None:
            waiter = loop.create_future()
            self._waiter = waiter  # publish first, then look again: `push` appends, then checks the waiter
            try:
                if not self._items and self.failure is None:
                    await waiter
            finally:
                self._waiter = None

    def push_alternatives(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """Engine side (or whoever delivers), before `push`ing the character: its top alternatives, cut to
        the number this stream asked for."""
        if self.alternatives is not None:
            n = self.params.alternatives
            self.alternatives.append((ids[:n].tolist(), logprobs[:n].tolist()))

    def push(self, item: Item) -> bool:
        """Engine side (or whoever delivers): queues one character; True if the consumer waits for it
        and must be woken on the loop (`wake`)."""
        self._items.append(item)
        return self._waiter is not None  # after the append: see `wait`

    @property
    def waiting(self) -> bool:
        """Loop side: whether the consumer waits for the engine now."""
        return self._waiter is not None

    def wake(self) -> None:
        """Loop side: ends a pending `wait()`."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Item:
        if self._ended:
            raise StopAsyncIteration
        item = self.pop()
        while item is None:
            await self.wait()
            item = self.pop()
        self._ended = item[2] is not Finish.NONE
        return item


Result = tuple[np.ndarray, np.ndarray]  # a job's logits [T, V] and its state after the last id
Traced = tuple[np.ndarray, np.ndarray, np.ndarray]  # and hidden [T, num_layers, hidden_size] (a tracing job)


@dataclass(eq=False)
class Job:
    """A Predict/Step request: feed ids from a host state, return the logits and the final state.

    future: where the thread engine's caller awaits the result; key: the job's id between the server
    and an engine process (which answers by id instead); last_only: only the last row of the logits
    is wanted; hidden: the model's `hidden` output is wanted too (a Traced result; never a rider in a
    step call, whose output it is not); dropped: the caller has gone (the engine process learns it from
    the server)."""

    ids: np.ndarray
    state: np.ndarray | None
    future: asyncio.Future[Any] | None = None
    key: int = 0
    last_only: bool = False
    hidden: bool = False
    dropped: bool = False

    def cancelled(self) -> bool:
        return self.dropped or (self.future is not None and self.future.cancelled())

    def result(self, logits: np.ndarray, state: np.ndarray, hidden: np.ndarray | None = None) -> Result | Traced:
        """What the caller gets from its rows of a call: logits [T, V], or [1, V] when last_only; with
        hidden [T, L, H] when the job asked for it."""
        logits = logits[-1:] if self.last_only else logits
        if self.hidden:
            assert hidden is not None, "a tracing job ran in a call that did not fetch hidden"
            return logits, state, hidden
        return logits, state


@dataclass(frozen=True)
class Stop:
    """The last thing an engine's inbox hands the scheduler: end, failing what is left with `reason`."""

    reason: str
