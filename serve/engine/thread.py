"""The thread engine (--engine thread): the scheduler in a worker thread of the server process.

The asyncio loop only enqueues work and consumes results. The worker appends each character straight to
its stream's deque and, once per onnxruntime call, hands the loop what needs it (streams whose consumer
waits, Predict/Step results, failures) through an outbox, waking the loop (`call_soon_threadsafe`) only
when it is not already due to drain it. So the loop sends step k's characters while the worker
computes step k+1.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from serve.engine.protocol import EngineState, Finish, SamplingParams, StepMetrics
from serve.engine.runtime import Runtime
from serve.engine.scheduler import Alternatives, JobOutcome, Scheduler, Work
from serve.engine.stream import Job, Result, Stop, Stream, Traced
from serve.errors import Unavailable
from serve.ops.metrics import Metrics


class _QueueInbox:
    """The scheduler's inbox: a queue the loop puts work into."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Work] = queue.SimpleQueue()

    def get(self, timeout: float | None) -> list[Work] | None:
        try:
            return [self.queue.get(timeout=timeout) if timeout != 0.0 else self.queue.get_nowait()]
        except queue.Empty:
            return None

    def leftovers(self) -> list[Work]:
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items


def _wake(streams: list[Stream]) -> None:
    for stream in streams:
        stream.wake()


def _fail(payload: tuple[list[Stream], BaseException]) -> None:
    streams, error = payload
    for stream in streams:
        stream.failure = error
        stream.wake()


def _resolve(outcomes: list[JobOutcome]) -> None:
    for job, value, error in outcomes:
        future = job.future
        if future is None or future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            assert value is not None
            future.set_result(value)


class _LoopSink:
    """The scheduler's output, handed to the event loop through one outbox and as few wake-ups as can be."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self._wake_pending = False

    def chars(self, rows: list[Stream], tokens: list[int], logprobs: np.ndarray, finishes: list[Finish],
              alternatives: Alternatives | None = None) -> None:
        if alternatives is not None:
            for row, ids, top in zip(*alternatives, strict=True):
                rows[row].push_alternatives(ids, top)
        waiting = [s for s, token, logprob, finish in zip(rows, tokens, logprobs.tolist(), finishes, strict=True)
                   if s.push((token, logprob, finish))]
        if waiting:
            self._post(_wake, waiting)

    def results(self, outcomes: list[JobOutcome]) -> None:
        if outcomes:
            self._post(_resolve, outcomes)

    def failed(self, streams: list[Stream], error: BaseException) -> None:
        if streams:
            self._post(_fail, (streams, error))

    def flush(self, hold: bool) -> None:
        pass  # everything is posted as it happens

    def alive(self) -> None:
        pass  # no watchdog watches a thread

    def _post(self, callback: Callable[[Any], None], payload: Any) -> None:
        """Hands results to the loop; wakes it (a syscall) only if it has not been woken already."""
        self._outbox.append((callback, payload))
        if not self._wake_pending:
            self._wake_pending = True
            assert self.loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """Loop side: runs everything posted so far (clear the flag first, then drain: no lost wake-up)."""
        self._wake_pending = False
        outbox = self._outbox
        while outbox:
            callback, payload = outbox.popleft()
            callback(payload)


class ThreadEngine:
    """The Engine protocol (serve/engine/protocol.py) over a Scheduler in a thread; `start(loop)` runs
    the thread, `stop()` ends it."""

    def __init__(self, runtime: Runtime, max_batch: int = 256, max_delay_us: int = 200,
                 window: int = 1024, metrics: StepMetrics | None = None, prompt_cache_bytes: int = 0) -> None:
        self.runtime = runtime
        self.spec = runtime.spec
        self.vocab = runtime.spec.vocab
        self.provider = runtime.provider
        self.metrics = metrics if metrics is not None else Metrics()
        self._inbox = _QueueInbox()
        self._sink = _LoopSink()
        self.scheduler = Scheduler(runtime, self._inbox, self._sink, self.metrics, max_batch, max_delay_us, window,
                                   prompt_cache_bytes)
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def stats(self) -> Mapping[str, float]:
        return self.scheduler.stats

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = self._sink.loop = loop
        self._thread = threading.Thread(target=self.scheduler.run, name="charrnn-engine", daemon=True)
        self._thread.start()

    def watch(self, callback: Callable[[EngineState], None]) -> None:
        """Nothing to report: the worker thread outlives any failure of a call (each fails alone), and a
        thread cannot be killed and replaced the way an engine process is."""

    def stop(self, reason: str = "the server is shutting down") -> None:
        if self._thread is not None and self._thread.is_alive():
            self._stopping = True  # refuse new work before the worker drains the inbox for the last time
            self._inbox.queue.put(Stop(reason))
            self._thread.join()

    @property
    def running(self) -> bool:
        return not self._stopping and self._thread is not None and self._thread.is_alive()

    def _check_running(self) -> None:
        if not self.running:
            raise Unavailable("the engine is not running")

    def generate(self, prompt: np.ndarray, params: SamplingParams, max_chars: int,
                 stops: Sequence[str] = ()) -> Stream:
        self._check_running()
        stream = Stream(prompt, params, max_chars, stops, self.vocab)
        self._inbox.queue.put(stream)
        return stream

    async def predict(self, ids: np.ndarray, state: np.ndarray | None, last_only: bool = False) -> Result:
        self._check_running()
        assert self._loop is not None
        future: asyncio.Future[Result] = self._loop.create_future()  # cancelled with its caller: dropped
        self._inbox.queue.put(Job(ids, state, future, last_only=last_only))
        return await future

    async def infer(self, ids: np.ndarray, state: np.ndarray) -> Result:
        return await self.predict(ids, state)  # a Job returns every row of logits

    async def trace(self, ids: np.ndarray, state: np.ndarray | None) -> Traced:
        self._check_running()
        assert self._loop is not None
        future: asyncio.Future[Traced] = self._loop.create_future()
        self._inbox.queue.put(Job(ids, state, future, hidden=True))
        return await future
