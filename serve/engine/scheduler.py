"""Where batching happens: continuous batching of every stream's next character into one onnxruntime call.

The scheduler runs in one thread, owns the runtime, and reaches the world through two seams: an
`Inbox` it takes new work from, and a `Sink` it hands characters, results and failures to. The thread
engine (serve/engine/thread.py) gives it a queue and the event loop; the engine process
(serve/process/child.py) gives it the pipe from the server and the pipe back. Knows nothing about gRPC.

Each iteration:
  1. Predict/Step jobs: grouped by text length, one call per group (seq = length); while streams are
     stepping, one-character jobs instead ride in step 3's call as extra rows (host state only).
  2. New Generate streams: prompts fed in chunks (serve/engine/prefill.py), from the prompt cache's
     longest prefix when it is on, then their first characters are sampled together.
  3. One step of every active stream: one call per `max_batch` rows, vectorised sampling.
Every prefill or job call holds at most MAX_CALL_CHARS characters (rows x length).
A stream whose consumer lags `window` characters behind sits out (parked) until it catches up.
`max_batch=1` is the unbatched mode: every stream gets its own call per character.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from serve.engine import sampling
from serve.engine.prefill import Prefill
from serve.engine.prompt_cache import PromptCache
from serve.engine.protocol import Finish, StepMetrics
from serve.engine.runtime import Runtime
from serve.engine.stream import Job, Result, Stop, Stream, Traced
from serve.errors import EngineFailure, ServeError, Unavailable

log = logging.getLogger(__name__)

Work = Stream | Job | Stop
JobOutcome = tuple[Job, Result | Traced | None, BaseException | None]  # (job, its result, or the error it failed with)
# The top alternatives of the rows that asked for them: (row indices into the call's rows, token ids [m, K],
# their log-probabilities [m, K]), K the largest number any of those rows asked for.
Alternatives = tuple[np.ndarray, np.ndarray, np.ndarray]


class Inbox(Protocol):
    def get(self, timeout: float | None) -> list[Work] | None:
        """What arrived, waiting up to timeout seconds (None: until something comes, 0: not at all);
        None when nothing did (an empty list: something came that holds no new work)."""

    def leftovers(self) -> list[Work]:
        """After a Stop: what was still queued behind it."""


class Sink(Protocol):
    """Where the scheduler's output goes; called on the scheduler's thread."""

    def chars(self, rows: list[Stream], tokens: list[int], logprobs: np.ndarray, finishes: list[Finish],
              alternatives: Alternatives | None = None) -> None:
        """One character for each row (stream rows[i] got tokens[i]); `Stream.done` is already set. A row
        with alternatives gets them before its character (see Stream.alternatives)."""

    def results(self, outcomes: list[JobOutcome]) -> None: ...

    def failed(self, streams: list[Stream], error: BaseException) -> None: ...

    def flush(self, hold: bool) -> None:
        """Between iterations: hand over what is held back. hold: the scheduler goes straight on stepping,
        so output that is not urgent may wait a little longer (see serve/process/child.py's PipeSink);
        False: it is about to wait for work, everything goes now."""

    def alive(self) -> None:
        """Long work goes on (a long prompt's prefill): say so, or the engine process's watchdog
        (serve/process/proxy.py) would take the silence for a hang."""


class _Batch:
    """Up to max_batch streams stepped by one onnxruntime call; their state stays on the device."""

    def __init__(self, rows: list[Stream], state: Any) -> None:
        self.rows = rows
        self.state = state
        self.params = row_params(rows)
        self.generators = [s.generator for s in rows]


def row_params(rows: list[Stream]) -> sampling.RowParams:
    return sampling.RowParams(np.array([s.params.temperature for s in rows], dtype=np.float64),
                              np.array([s.params.top_k for s in rows], dtype=np.int64),
                              np.array([s.params.top_p for s in rows], dtype=np.float64),
                              np.array([s.params.alternatives for s in rows], dtype=np.int64))


# Characters (rows x sequence length) in one prefill or Predict/Step call. The call's logits alone are
# this x vocab floats, so without a cap 256 concurrent 10,000-character prompts would ask for a gigabyte.
MAX_CALL_CHARS = 65_536

# Seconds between signs of life during a long prefill (an empty record each): well under any sensible
# --engine-hang-seconds (5 by default).
ALIVE_EVERY = 0.1

T = TypeVar("T")


def _group(items: list[T], length: Callable[[T], int], size: int) -> list[list[T]]:
    """Items with equal `length(item)`, in arrival order, in chunks of at most `size` rows and at most
    MAX_CALL_CHARS characters (a longer single item still gets a call of its own)."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(length(item), []).append(item)
    chunks = []
    for n, group in groups.items():
        rows = max(1, min(size, MAX_CALL_CHARS // max(n, 1)))
        chunks += [group[i:i + rows] for i in range(0, len(group), rows)]
    return chunks


def _stop(items: Sequence[Work]) -> Stop | None:
    for item in items:
        if isinstance(item, Stop):
            return item
    return None


def empty_prompt_logprobs(runtime: Runtime) -> np.ndarray:
    """log of mean_c softmax(logits(zero state, c)): how an empty prompt's first char is drawn."""
    vocab = len(runtime.spec.vocab)
    ids = np.arange(vocab, dtype=np.int64).reshape(vocab, 1)
    logits, _ = runtime.run(ids, runtime.zero_state(vocab))
    probs = np.exp(sampling.log_softmax(logits[:, 0, :])).mean(axis=0)
    out: np.ndarray = np.log(probs)
    return out


class Scheduler:
    """The batching loop over one runtime: `run()` until the inbox hands it a Stop."""

    def __init__(self, runtime: Runtime, inbox: Inbox, sink: Sink, metrics: StepMetrics, max_batch: int = 256,
                 max_delay_us: int = 200, window: int = 1024, prompt_cache_bytes: int = 0) -> None:
        """prompt_cache_bytes: the prompt cache's capacity (serve/engine/prompt_cache.py); 0 = none."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.runtime = runtime
        self.inbox = inbox
        self.sink = sink
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_delay = max_delay_us / 1e6
        self.window = window
        self.first_logprobs = empty_prompt_logprobs(runtime)
        self._active: list[Stream] = []
        self._rows: list[Stream] = []
        self._batches: list[_Batch] = []
        self.stats = {"step_calls": 0, "step_rows": 0, "prefill_calls": 0, "prefill_chars": 0, "job_calls": 0,
                      "rider_rows": 0, "dropped_jobs": 0, "ort_seconds": 0.0}
        cache = PromptCache(prompt_cache_bytes, runtime.spec.sha256) if prompt_cache_bytes > 0 else None
        self.prefill = Prefill(lambda ids, state: self._ort(runtime.run, ids, state), runtime.zero_state(1)[0],
                               cache, metrics, self.stats, _group, self._alive)
        self._said_alive = 0.0

    def run(self) -> None:
        stepped = False
        while True:
            if not self._active:
                wait: float | None = None
            else:
                wait = 0.0 if stepped else 0.005  # all parked: poll until a consumer catches up
            self.sink.flush(hold=wait == 0.0)  # about to wait for work: nothing may stay held back
            items = self._receive(wait, idle=not self._active)
            stop = _stop(items)
            if stop is not None:
                self._shutdown(items, stop.reason)
                self.sink.flush(hold=False)
                return
            try:
                jobs = [i for i in items if isinstance(i, Job)]
                fresh = [i for i in items if isinstance(i, Stream)]
                riders: list[Job] = []
                if self._active:  # one-character Predict/Step jobs ride along in the step call
                    riders = [j for j in jobs if len(j.ids) == 1 and not j.hidden]
                    jobs = [j for j in jobs if len(j.ids) != 1 or j.hidden]
                if jobs:
                    self._run_jobs(jobs)
                if fresh:
                    self._admit(fresh)
                stepped = self._step(riders) if self._active else False
            except Exception:  # keep serving; fail only the requests in flight
                log.exception("engine iteration failed")
                self._active.extend(i for i in items if isinstance(i, Stream) and not i.done and i not in self._active)
                self._fail_all([i for i in items if isinstance(i, Job)], EngineFailure("model execution failed"))
                stepped = False

    def _receive(self, wait: float | None, idle: bool) -> list[Work]:
        """What arrived within `wait`; when idle, up to --max-delay-us more for concurrent arrivals
        (so that they share their first call)."""
        items = self.inbox.get(wait)
        if items is None:
            return []
        stopped = _stop(items) is not None  # looked for in what each get returned: arrivals can be many
        if idle and self.max_delay > 0:
            deadline = time.perf_counter() + self.max_delay
            while len(items) < self.max_batch and not stopped:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                more = self.inbox.get(left)
                if more is None:
                    break
                items += more
                stopped = _stop(more) is not None
        while not stopped:
            more = self.inbox.get(0.0)
            if more is None:
                break
            items += more
            stopped = _stop(more) is not None
        return items

    def _ort(self, call: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        result = call(*args)
        self.stats["ort_seconds"] += time.perf_counter() - start
        return result

    def _alive(self) -> None:
        now = time.perf_counter()
        if now - self._said_alive >= ALIVE_EVERY:
            self._said_alive = now
            self.sink.alive()

    def _run_jobs(self, jobs: list[Job]) -> None:
        jobs = self._live(jobs)
        # jobs that want `hidden` get calls of their own: the others need not fetch it
        groups = [group for wants in (False, True)
                  for group in _group([j for j in jobs if j.hidden == wants], lambda j: len(j.ids), self.max_batch)]
        for group in groups:
            ids = np.stack([j.ids for j in group])
            state = self.runtime.zero_state(len(group))
            for i, job in enumerate(group):
                if job.state is not None:
                    state[i] = job.state
            hidden = None
            try:
                if group[0].hidden:
                    logits, state_out, hidden = self._ort(self.runtime.run_hidden, ids, state)
                else:
                    logits, state_out = self._ort(self.runtime.run, ids, state)
            except Exception:
                log.exception("onnxruntime failed on a Predict/Step batch")
                self.sink.results([(j, None, EngineFailure("model execution failed")) for j in group])
                continue
            self.stats["job_calls"] += 1
            self.sink.results([(j, j.result(logits[i], state_out[i], None if hidden is None else hidden[i]), None)
                               for i, j in enumerate(group)])

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose callers still wait: one that has gone is dropped before its call."""
        live = [j for j in jobs if not j.cancelled()]
        self.stats["dropped_jobs"] += len(jobs) - len(live)
        return live

    def _admit(self, fresh: list[Stream]) -> None:
        waiting = len(fresh)
        fresh = [s for s in fresh if not s.cancelled]
        if len(fresh) != waiting:
            self.metrics.cancelled_streams.inc(waiting - len(fresh))
        if not fresh:
            return
        first = self.prefill.feed([s for s in fresh if len(s.prompt)], self.max_batch, self._abandon)
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
        """Samples one character per row and hands them to the sink; True if a stream ended."""
        tokens, logprobs = sampling.sample(logits, params, uniforms)
        chosen = tokens.tolist()
        finishes = [s.emitted(t) for s, t in zip(rows, chosen, strict=True)]
        alternatives = None
        wanted = params.alternative_rows
        if len(wanted):  # only the rows that asked pay for the sort
            ids, top = sampling.top_logprobs(logits[wanted], int(params.alternatives[wanted].max()))
            alternatives = (wanted, ids, top)
        self.sink.chars(rows, chosen, logprobs, finishes, alternatives)
        return any(finishes)

    def _step(self, riders: list[Job] | None = None) -> bool:
        """One character for every stream that may run; False when all of them are parked.

        riders: one-character Predict/Step jobs, added as extra rows to a step call whose state is on the
        host (CPU) while it has room; whatever does not fit gets a call of its own.
        """
        riders = self._live(riders or [])
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
            extra: list[Job] = []
            if riders and isinstance(batch.state, np.ndarray) and n < self.max_batch:
                extra, riders = riders[: self.max_batch - n], riders[self.max_batch - n:]
            start = time.perf_counter()
            try:
                if extra:
                    logits, batch.state = self._step_with_riders(ids, batch.state, extra)
                else:
                    logits, batch.state = self.runtime.step(ids.reshape(-1, 1), batch.state)
            except Exception:  # fail this batch only; the other batches keep going
                log.exception("onnxruntime failed on a step batch of %d", n + len(extra))
                self._abandon(batch.rows)
                self.sink.results([(j, None, EngineFailure("model execution failed")) for j in extra])
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

    def _step_with_riders(self, ids: np.ndarray, state: np.ndarray, extra: list[Job]) -> tuple[np.ndarray, np.ndarray]:
        """One call for the batch's rows plus the riders' rows; resolves the riders, returns the batch's part."""
        n = len(ids)
        zero = self.runtime.zero_state(1)[0]
        all_ids = np.concatenate([ids, [j.ids[0] for j in extra]]).reshape(-1, 1)
        all_states = np.concatenate([state, np.stack([zero if j.state is None else j.state for j in extra])])
        logits, state_out = self.runtime.step(all_ids, all_states)
        self.stats["rider_rows"] += len(extra)
        self.sink.results([(j, (logits[n + i][None, :], state_out[n + i]), None) for i, j in enumerate(extra)])
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
            states = np.stack([s.state for s in chunk])  # type: ignore[misc]  # running streams were prefilled: none has state None
            self._batches.append(_Batch(chunk, self.runtime.upload(states)))
        self._rows = rows

    def _abandon(self, streams: list[Stream]) -> None:
        """Ends these streams with EngineFailure; `_step` drops them (they are done) and re-forms batches."""
        for s in streams:
            s.done = True
        self.sink.failed(streams, EngineFailure("model execution failed"))

    def _fail_all(self, jobs: list[Job], error: ServeError) -> None:
        self.sink.results([(j, None, error) for j in jobs])
        # a stream that got its last character in this step has ended well: its consumer must see that
        self.sink.failed([s for s in self._active if not s.done], error)
        for s in self._active:
            s.done = True
        self._active, self._rows, self._batches = [], [], []

    def _shutdown(self, items: list[Work], reason: str) -> None:
        error = Unavailable(reason)
        self._active.extend(i for i in items if isinstance(i, Stream))
        self.metrics.cancelled_streams.inc(len(self._active))
        self._fail_all([i for i in items if isinstance(i, Job)], error)
        left = self.inbox.leftovers()
        self.sink.results([(j, None, error) for j in left if isinstance(j, Job)])
        self.sink.failed([s for s in left if isinstance(s, Stream)], error)
