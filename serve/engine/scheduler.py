"""The engine: continuous batching of every stream's next character into one onnxruntime call.

Where the state lives: a Generate stream's recurrent state sits in a row of its step batch's
device state (numpy on CPU, an OrtValue on CUDA) while it is being stepped, and in `Stream.state`
(host) only while it waits outside a batch. Predict and Step carry their own host state.

Threads: one worker thread owns the runtime and runs everything here; the asyncio loop only
enqueues work and consumes results. The worker appends each character straight to its stream's deque
and, once per onnxruntime call, hands the loop what needs it (streams whose consumer waits, Predict/Step
results, failures) through an outbox, waking the loop (`call_soon_threadsafe`) only when it is not
already due to drain it. So the loop sends step k's characters while the worker computes step k+1.
Knows nothing about gRPC. With `--engine process` (the default) this same Engine runs in a process of
its own (serve/process/proxy.py), its deliveries turned into records on a pipe.

Each engine iteration:
  1. Predict/Step jobs: grouped by text length, one call per group (seq = length); while streams are
     stepping, one-character jobs instead ride in step 3's call as extra rows (host state only).
  2. New Generate streams: prompts grouped by length, one call per group (seq = prompt length),
     then their first characters are sampled together.
  3. One step of every active stream: one call per `max_batch` rows, vectorised sampling.
Every prefill or job call holds at most MAX_CALL_CHARS characters (rows x length).
A stream whose consumer lags `window` characters behind sits out (parked) until it catches up.
`max_batch=1` is the unbatched mode: every stream gets its own call per character.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.engine import sampling
from serve.errors import EngineFailure, ServeError, Unavailable
from serve.ops.metrics import Metrics
from serve.engine.runtime import Runtime

log = logging.getLogger(__name__)


class Finish(enum.IntEnum):
    """Why a stream ended (NONE on every character but the last)."""

    NONE = 0
    LENGTH = 1
    STOP = 2


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int | None = None   # None = a fresh random seed


class Stream:
    """One Generate request inside the engine. On the loop: `pop()` the next (token, logprob, finish),
    `await wait()` when there is none yet, or simply iterate it.

    The engine `push`es straight into a deque (append and popleft are atomic) and wakes the loop only
    for streams whose consumer is waiting, so a consumer that keeps up with a faster engine costs no
    cross-thread call at all. Loop side: `consumed`, `cancelled`, `failure`, the waiter and the popping
    end of the deque; engine side: everything else.
    """

    def __init__(self, prompt: np.ndarray, params: SamplingParams, max_chars: int, stops: Sequence[str],
                 vocab: Sequence[str]) -> None:
        self.prompt = prompt
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.generator = np.random.default_rng(self.seed)
        self.max_chars = max_chars
        self.stops = tuple(stops)
        self._stop_len = max((len(s) for s in self.stops), default=0)
        self._vocab = vocab
        self.tail = ""
        self._items: collections.deque[tuple[int, float, Finish]] = collections.deque()
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
        self.cancelled = True

    def pop(self) -> tuple[int, float, Finish] | None:
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

    def push(self, item: tuple[int, float, Finish]) -> bool:
        """Engine side (or whoever delivers): queues one character; True if the consumer waits for it
        and must be woken on the loop (`wake`)."""
        self._items.append(item)
        return self._waiter is not None  # after the append: see `wait`

    def wake(self) -> None:
        """Loop side: ends a pending `wait()`."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> tuple[int, float, Finish]:
        if self._ended:
            raise StopAsyncIteration
        item = self.pop()
        while item is None:
            await self.wait()
            item = self.pop()
        self._ended = item[2] is not Finish.NONE
        return item


@dataclass
class _Job:
    """A Predict/Step request: feed ids from a host state, return all logits and the final state."""

    ids: np.ndarray
    state: np.ndarray | None
    future: asyncio.Future[tuple[np.ndarray, np.ndarray]]


class _Batch:
    """Up to max_batch streams stepped by one onnxruntime call; their state stays on the device."""

    def __init__(self, rows: list[Stream], state: Any) -> None:
        self.rows = rows
        self.state = state
        self.params = row_params(rows)
        self.generators = [s.generator for s in rows]


_STOP = object()


def row_params(rows: list[Stream]) -> sampling.RowParams:
    return sampling.RowParams(np.array([s.params.temperature for s in rows], dtype=np.float64),
                              np.array([s.params.top_k for s in rows], dtype=np.int64),
                              np.array([s.params.top_p for s in rows], dtype=np.float64))


# Characters (rows x sequence length) in one prefill or Predict/Step call. The call's logits alone are
# this x vocab floats, so without a cap 256 concurrent 10,000-character prompts would ask for a gigabyte.
MAX_CALL_CHARS = 65_536


def _group(items: list[Any], length: Any, size: int) -> list[list[Any]]:
    """Items with equal `length(item)`, in arrival order, in chunks of at most `size` rows and at most
    MAX_CALL_CHARS characters (a longer single item still gets a call of its own)."""
    groups: dict[int, list[Any]] = {}
    for item in items:
        groups.setdefault(length(item), []).append(item)
    chunks = []
    for n, group in groups.items():
        rows = max(1, min(size, MAX_CALL_CHARS // max(n, 1)))
        chunks += [group[i:i + rows] for i in range(0, len(group), rows)]
    return chunks


def _wake(streams: list[Stream]) -> None:
    for stream in streams:
        stream.wake()


def _fail(items: list[tuple[Stream, BaseException]]) -> None:
    for stream, error in items:
        stream.failure = error
        stream.wake()


def _resolve(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in items:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class Engine:
    """Owns the runtime; `start(loop)` runs the worker thread, `stop()` ends it."""

    def __init__(self, runtime: Runtime, max_batch: int = 256, max_delay_us: int = 200,
                 window: int = 1024, metrics: Metrics | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.runtime = runtime
        self.spec = runtime.spec
        self.vocab = runtime.spec.vocab
        self.max_batch = max_batch
        self.max_delay = max_delay_us / 1e6
        self.window = window
        self.metrics = metrics if metrics is not None else Metrics()
        self.first_logprobs = self._empty_prompt_logprobs()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: collections.deque[tuple[Any, list[Any]]] = collections.deque()
        self._wake_pending = False
        self._stop_reason = "the server is shutting down"
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._active: list[Stream] = []
        self._rows: list[Stream] = []
        self._batches: list[_Batch] = []
        self.stats = {"step_calls": 0, "step_rows": 0, "prefill_calls": 0, "job_calls": 0, "rider_rows": 0,
                      "ort_seconds": 0.0}

    def _empty_prompt_logprobs(self) -> np.ndarray:
        """log of mean_c softmax(logits(zero state, c)): how an empty prompt's first char is drawn."""
        vocab = len(self.vocab)
        ids = np.arange(vocab, dtype=np.int64).reshape(vocab, 1)
        logits, _ = self.runtime.run(ids, self.runtime.zero_state(vocab))
        probs = np.exp(sampling.log_softmax(logits[:, 0, :])).mean(axis=0)
        return np.log(probs)

    # ---- loop side -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="charrnn-engine", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Ends the worker; streams and jobs still in it fail with Unavailable(reason)."""
        if self._thread is not None and self._thread.is_alive():
            self._stop_reason = reason
            self._stopping = True  # refuse new work before the worker drains the inbox for the last time
            self._inbox.put(_STOP)
            self._thread.join()

    @property
    def running(self) -> bool:
        return not self._stopping and self._thread is not None and self._thread.is_alive()

    def _check_running(self) -> None:
        if not self.running:
            raise Unavailable("the engine is not running")

    def generate(self, prompt: np.ndarray, params: SamplingParams, max_chars: int,
                 stops: Sequence[str] = ()) -> Stream:
        """Registers a Generate stream; iterate the result for its characters, `close()` it when done."""
        self._check_running()
        stream = Stream(prompt, params, max_chars, stops, self.vocab)
        self._inbox.put(stream)
        return stream

    async def predict(self, ids: np.ndarray, state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Feeds ids [T] from state (None = zero state): logits [T, V] and the state after the last id."""
        self._check_running()
        assert self._loop is not None
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = self._loop.create_future()
        self._inbox.put(_Job(ids, state, future))
        return await future

    # ---- worker side -----------------------------------------------------------------------------
    def _run(self) -> None:
        stepped = False
        while True:
            if not self._active:
                wait: float | None = None
            else:
                wait = 0.0 if stepped else 0.005  # all parked: poll until a consumer catches up
            items = self._receive(wait, idle=not self._active)
            if any(item is _STOP for item in items):
                self._shutdown(items)
                return
            try:
                jobs = [i for i in items if isinstance(i, _Job)]
                fresh = [i for i in items if isinstance(i, Stream)]
                riders: list[_Job] = []
                if self._active:  # one-character Predict/Step jobs ride along in the step call
                    riders = [j for j in jobs if len(j.ids) == 1]
                    jobs = [j for j in jobs if len(j.ids) != 1]
                if jobs:
                    self._run_jobs(jobs)
                if fresh:
                    self._admit(fresh)
                stepped = self._step(riders) if self._active else False
            except Exception:  # noqa: BLE001 - keep serving; fail only the requests in flight
                log.exception("engine iteration failed")
                self._active.extend(i for i in items if isinstance(i, Stream) and not i.done and i not in self._active)
                self._fail_all([i for i in items if isinstance(i, _Job)], EngineFailure("model execution failed"))
                stepped = False

    def _receive(self, wait: float | None, idle: bool) -> list[Any]:
        items: list[Any] = []
        try:
            items.append(self._inbox.get(timeout=wait) if wait != 0.0 else self._inbox.get_nowait())
        except queue.Empty:
            return items
        if idle and self.max_delay > 0:  # starting from idle: give concurrent arrivals a moment
            deadline = time.perf_counter() + self.max_delay
            while len(items) < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    items.append(self._inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _post(self, callback: Any, payload: list[Any]) -> None:
        """Hands results to the loop; wakes it (a syscall) only if it has not been woken already."""
        self._outbox.append((callback, payload))
        if not self._wake_pending:
            self._wake_pending = True
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _drain(self) -> None:
        """Loop side: runs everything posted so far (clear the flag first, then drain: no lost wake-up)."""
        self._wake_pending = False
        outbox = self._outbox
        while outbox:
            callback, payload = outbox.popleft()
            callback(payload)

    def _ort(self, call: Any, *args: Any) -> Any:
        start = time.perf_counter()
        result = call(*args)
        self.stats["ort_seconds"] += time.perf_counter() - start
        return result

    def _run_jobs(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if not j.future.cancelled()]
        for group in _group(jobs, lambda j: len(j.ids), self.max_batch):
            ids = np.stack([j.ids for j in group])
            state = self.runtime.zero_state(len(group))
            for i, job in enumerate(group):
                if job.state is not None:
                    state[i] = job.state
            try:
                logits, state_out = self._ort(self.runtime.run, ids, state)
            except Exception:  # noqa: BLE001
                log.exception("onnxruntime failed on a Predict/Step batch")
                self._post(_resolve, [(j.future, None, EngineFailure("model execution failed")) for j in group])
                continue
            self.stats["job_calls"] += 1
            self._post(_resolve, [(j.future, (logits[i], state_out[i]), None) for i, j in enumerate(group)])

    def _admit(self, fresh: list[Stream]) -> None:
        waiting = len(fresh)
        fresh = [s for s in fresh if not s.cancelled]
        if len(fresh) != waiting:
            self.metrics.cancelled_streams.inc(waiting - len(fresh))
        if not fresh:
            return
        first: dict[int, np.ndarray] = {}
        prompted = [s for s in fresh if len(s.prompt)]
        for group in _group(prompted, lambda s: len(s.prompt), self.max_batch):
            ids = np.stack([s.prompt for s in group])
            try:
                logits, state_out = self._ort(self.runtime.run, ids, self.runtime.zero_state(len(group)))
            except Exception:  # noqa: BLE001 - fail this group only; other streams keep going
                log.exception("onnxruntime failed on a prefill batch")
                self._abandon(group)
                continue
            self.stats["prefill_calls"] += 1
            for i, s in enumerate(group):
                s.state = state_out[i]
                first[id(s)] = logits[i, -1]
        fresh = [s for s in fresh if not s.done]
        if not fresh:
            return
        zero = self.runtime.zero_state(1)[0]
        for s in fresh:
            if not len(s.prompt):
                s.state = zero
                first[id(s)] = self.first_logprobs
        logits = np.stack([first[id(s)] for s in fresh])
        self._sample_and_deliver(fresh, logits, row_params(fresh), sampling.draw([s.generator for s in fresh]))
        self.metrics.characters.inc(len(fresh))
        self._active.extend(s for s in fresh if not s.done)

    def _sample_and_deliver(self, rows: list[Stream], logits: np.ndarray, params: sampling.RowParams,
                            uniforms: np.ndarray) -> bool:
        tokens, logprobs = sampling.sample(logits, params, uniforms)
        waiting = []
        ended = False
        for s, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            finish = s.emitted(token)
            ended = ended or bool(finish)
            if s.push((token, logprob, finish)):
                waiting.append(s)
        if waiting:
            self._post(_wake, waiting)
        return ended

    def _step(self, riders: list[_Job] | None = None) -> bool:
        """One character for every stream that may run; False when all of them are parked.

        riders: one-character Predict/Step jobs, added as extra rows to a step call whose state is on the
        host (CPU) while it has room; whatever does not fit gets a call of its own.
        """
        riders = [j for j in riders or () if not j.future.cancelled()]
        if any(s.cancelled for s in self._active):
            active = len(self._active)
            self._active = [s for s in self._active if not s.cancelled]
            self.metrics.cancelled_streams.inc(active - len(self._active))
        window, rejoin = self.window, self.window // 2
        rows = []
        for s in self._active:
            lag = s.produced - s.consumed
            # Park at a full window, rejoin at half of it: a consumer hovering at the limit would
            # otherwise change the batch (and on CUDA move every state through the host) each step.
            if s.parked:
                s.parked = lag > rejoin
            elif lag >= window:
                s.parked = True
            if not s.parked:
                rows.append(s)
        if rows != self._rows:
            self._rebuild(rows)
        ended = False
        stats, metrics = self.stats, self.metrics
        for batch in self._batches:
            n = len(batch.rows)
            ids = np.fromiter((s.token for s in batch.rows), dtype=np.int64, count=n)
            extra: list[_Job] = []
            if riders and isinstance(batch.state, np.ndarray) and n < self.max_batch:
                extra, riders = riders[: self.max_batch - n], riders[self.max_batch - n:]
            start = time.perf_counter()
            try:
                if extra:
                    logits, batch.state = self._step_with_riders(ids, batch.state, extra)
                else:
                    logits, batch.state = self.runtime.step(ids.reshape(-1, 1), batch.state)
            except Exception:  # noqa: BLE001 - fail this batch only; the other batches keep going
                log.exception("onnxruntime failed on a step batch of %d", n + len(extra))
                self._abandon(batch.rows)
                self._post(_resolve, [(j.future, None, EngineFailure("model execution failed")) for j in extra])
                ended = True
                continue
            seconds = time.perf_counter() - start
            stats["ort_seconds"] += seconds
            stats["step_calls"] += 1
            stats["step_rows"] += n
            metrics.step_seconds.observe(seconds)  # once per call, not per character
            metrics.batch_size.observe(n)
            metrics.characters.inc(n)
            uniforms = sampling.draw(batch.generators)
            ended |= self._sample_and_deliver(batch.rows, logits, batch.params, uniforms)
        if riders:
            self._run_jobs(riders)
        if ended:
            self._active = [s for s in self._active if not s.done]
        return bool(rows)

    def _step_with_riders(self, ids: np.ndarray, state: np.ndarray,
                          extra: list[_Job]) -> tuple[np.ndarray, np.ndarray]:
        """One call for the batch's rows plus the riders' rows; resolves the riders, returns the batch's part."""
        n = len(ids)
        zero = self.runtime.zero_state(1)[0]
        all_ids = np.concatenate([ids, [j.ids[0] for j in extra]]).reshape(-1, 1)
        all_states = np.concatenate([state, np.stack([zero if j.state is None else j.state for j in extra])])
        logits, state_out = self.runtime.step(all_ids, all_states)
        self.stats["rider_rows"] += len(extra)
        self._post(_resolve, [(j.future, (logits[n + i][None, :], state_out[n + i]), None)
                              for i, j in enumerate(extra)])
        return logits[:n], state_out[:n]

    def _rebuild(self, rows: list[Stream]) -> None:
        """The set of running streams changed: park their states on the host and re-form batches."""
        for batch in self._batches:
            host = self.runtime.download(batch.state)
            for i, s in enumerate(batch.rows):
                s.state = host[i]
        self._batches = []
        for i in range(0, len(rows), self.max_batch):
            chunk = rows[i:i + self.max_batch]
            states = np.stack([s.state for s in chunk])  # type: ignore[misc]
            self._batches.append(_Batch(chunk, self.runtime.upload(states)))
        self._rows = rows

    def _abandon(self, streams: list[Stream]) -> None:
        """Ends these streams with EngineFailure; `_step` drops them (they are done) and re-forms batches."""
        for s in streams:
            s.done = True
        self._post(_fail, [(s, EngineFailure("model execution failed")) for s in streams])

    def _fail_all(self, jobs: list[_Job], error: ServeError) -> None:
        self._post(_resolve, [(j.future, None, error) for j in jobs])
        # a stream that got its last character in this step has ended well: its consumer must see that
        self._post(_fail, [(s, error) for s in self._active if not s.done])
        for s in self._active:
            s.done = True
        self._active, self._rows, self._batches = [], [], []

    def _shutdown(self, items: list[Any]) -> None:
        error = Unavailable(self._stop_reason)
        self._active.extend(i for i in items if isinstance(i, Stream))
        self.metrics.cancelled_streams.inc(len(self._active))
        self._fail_all([i for i in items if isinstance(i, _Job)], error)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                self._post(_resolve, [(item.future, None, error)])
            elif isinstance(item, Stream):
                self._post(_fail, [(item, error)])
