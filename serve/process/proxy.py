"""The process engine (--engine process, the default): the Engine protocol over a scheduler that runs in
a process of its own (serve/process/child.py), so that it shares no GIL with gRPC.

Why: in one process the engine thread and the event loop take turns on one GIL. Measured on 2 cores
(bench/serve.py), at 64 streams the engine thread was off the CPU for half of every step waiting for
its turn, and even with the model call skipped one stream got only a third of the transport ceiling.
With the engine there the server process keeps only gRPC and delivery, and the two run side by side.

    server process                               engine process (python -m serve.process.child)
    ProcessEngine.generate/predict  -- stdin ->  read between steps by the scheduler (one thread)
    Stream deques, waiters, futures <- stdout -- one Chars record per step

The records are in serve/process/records.py. The engine process ignores SIGINT/SIGTERM (a terminal's Ctrl-C
reaches the whole process group; the server drains and then stops the engine) and exits when its
stdin closes, so it never outlives the server.

If it dies, or hangs (work waits on it and nothing comes back for `hang_seconds`; it is then killed),
what it had in flight fails with UNAVAILABLE and a new one starts, from the model bytes read at start
(a file changed or gone since then changes nothing: only an explicit reload may change the model).
The engine's state (serve/engine/protocol.py EngineState) is RESTARTING meanwhile, SERVING once the
new one is ready, and FAILED after MAX_RESTARTS failed starts in a row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from serve.engine.protocol import EngineState, Finish, SamplingParams
from serve.engine.runtime import ModelSpec, read_model
from serve.engine.stream import Result, Stream, Traced
from serve.errors import EngineFailure, EngineLost, ServeError, Unavailable
from serve.ops.metrics import Metrics
from serve.process import records
from serve.process.pipe import readable

log = logging.getLogger(__name__)

CHILD = [sys.executable, "-m", "serve.process.child"]  # bench/model_skipped.py swaps in its own
_FINISH = tuple(Finish)
START_TIMEOUT = 120.0
MAX_RESTARTS = 5  # failed starts in a row before the engine is given up (EngineState.FAILED)


class ProcessEngine:
    """The Engine protocol (serve/engine/protocol.py) over a child process running the scheduler. This
    process reads the model's bytes and hands them to each child; the model is loaded and checked
    there only: this process learns its spec and provider from the child's Ready record, or gets the
    child's ModelError / DeviceError.

    hang_seconds: how long work may wait with nothing coming back before the child is taken for hung
    and killed (0: never). data: the model's bytes when the caller read them already (a reload checks
    exactly the bytes it hashed); None reads the file. prompt_cache_mb: the engine process's prompt cache
    (serve/engine/prompt_cache.py; 0 = none). log_level: the engine process's (DEBUG shows the prompt
    cache's line per admission)."""

    def __init__(self, model: str, device: str = "auto", threads: int = 1, max_batch: int = 256,
                 max_delay_us: int = 200, window: int = 1024, metrics: Metrics | None = None,
                 hang_seconds: float = 5.0, data: bytes | None = None, prompt_cache_mb: int = 0,
                 log_level: str = "WARNING") -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._model = data if data is not None else read_model(model)
        self.hang_seconds = hang_seconds
        self.metrics = metrics if metrics is not None else Metrics()
        self._stats = {"step_calls": 0, "step_rows": 0, "restarts": 0, "unclaimed_results": 0}
        # The engine parks a stream `window` ahead of what it knows was read and lets it rejoin at half
        # that. Reports every quarter window keep its knowledge under a quarter behind, so a reader who
        # caught up and waits is always within half a window: the stream rejoins, whatever the window.
        self.report_every = max(1, window // 4)
        self._args = ["--model", model, "--device", device, "--threads", str(threads), "--max-batch",
                      str(max_batch), "--max-delay-us", str(max_delay_us), "--window", str(window),
                      "--prompt-cache-mb", str(prompt_cache_mb), "--log-level", log_level]
        self._streams: dict[int, Stream] = {}
        self._jobs: dict[int, asyncio.Future[Any]] = {}  # of a Result, or a Traced for a trace
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Records for the engine process wait here while its stdin pipe is full. The loop must never
        # block on that pipe: the engine process blocks on its own stdout until the loop reads it.
        self._outgoing = bytearray()
        self._writing = False  # add_writer is set
        self._watchers: list[Callable[[EngineState], None]] = []
        self._progress = 0.0  # loop time of the last sign of life from the engine (or of having no work)
        self._hung = False  # the watchdog killed the engine process
        self._lost: EngineLost | None = None  # why the engine was given up (EngineState.FAILED)
        self.proc, (self.provider, self.spec) = self._spawn()
        self.vocab = self.spec.vocab

    @property
    def stats(self) -> Mapping[str, float]:
        return self._stats

    def _spawn(self) -> tuple[subprocess.Popen[bytes], tuple[str, ModelSpec]]:
        """Starts an engine process and waits for its Ready (or the error that stopped it).

        Its own session: a terminal's Ctrl-C goes to the server, which stops the engine when it is done."""
        proc = subprocess.Popen([*CHILD, *self._args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                close_fds=True, start_new_session=True)
        assert proc.stdout is not None and proc.stdin is not None
        self._reader = records.Reader()
        try:
            try:
                proc.stdin.write(records.encode(records.Model(self._model)))
                proc.stdin.flush()
            except BrokenPipeError:
                pass  # it exited before reading: what it said on stdout, or its silence, tells why
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                ready = readable(proc.stdout.fileno(), max(0.0, deadline - time.monotonic()))
                data = os.read(proc.stdout.fileno(), 1 << 16) if ready else b""
                if not data:
                    break
                for record in self._reader.feed(data):
                    if type(record) is records.Ready:
                        return proc, (record.provider, record.spec)
                    if type(record) is records.StartFailed:
                        proc.wait(timeout=10)
                        raise record.error.exception()
            raise EngineFailure("the engine process did not start")
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise

    # ---- lifetime (loop thread unless noted) --------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._attach()
        if self.hang_seconds > 0:
            loop.call_later(self.hang_seconds / 4, self._watchdog)

    def watch(self, callback: Callable[[EngineState], None]) -> None:
        self._watchers.append(callback)

    def _state(self, state: EngineState) -> None:
        for callback in self._watchers:
            callback(state)

    def _watchdog(self) -> None:
        """Every quarter of hang_seconds: kill the engine process if work has waited on it for
        hang_seconds with nothing coming back. A stream counts as waiting only while its consumer
        waits: one parked because its reader is slow is no work the engine owes."""
        if self._stopping:
            return
        assert self._loop is not None
        now = self._loop.time()
        if not self.running or not (self._jobs or any(s.waiting for s in self._streams.values())):
            self._progress = now
        elif now - self._progress >= self.hang_seconds and not self._hung:
            log.error("the engine process made no progress for %.1f s with work waiting; killing it",
                      now - self._progress)
            self._hung = True
            self.proc.kill()  # its stdout closes: _on_readable sees the end and restarts it
        self._loop.call_later(self.hang_seconds / 4, self._watchdog)

    def _attach(self) -> None:
        assert self._loop is not None and self.proc.stdout is not None and self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._on_readable)

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._stopping and self.proc.poll() is None

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Ends the engine process; streams and jobs still in it fail with Unavailable(reason). Runs on
        the loop thread or in an executor thread; a second call does nothing."""
        if self._stopping:
            return
        self._stopping = True
        on_loop = self._loop is not None and self._on_loop_thread()
        if self._loop is not None and not on_loop:
            try:
                self._loop.call_soon_threadsafe(self._send, records.Stop(reason), True)
            except RuntimeError:  # the loop is closed: nobody can send; end it the hard way below
                self.proc.kill()
        else:
            self._send(records.Stop(reason), quiet=True)
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and time.monotonic() < deadline:
            if on_loop:  # the loop is ours: move both pipes ourselves so the process can finish
                self._flush()
                self._read_available(0.05)
            else:
                time.sleep(0.01)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if on_loop:
            self._read_rest()

    def _read_available(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.closed:
            return
        if readable(self.proc.stdout.fileno(), timeout):
            try:
                data = os.read(self.proc.stdout.fileno(), 1 << 20)
            except BlockingIOError:
                return
            self._handle(data)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _read_rest(self) -> None:
        """The process has exited: handle what it wrote last (its failures) here and now."""
        assert self.proc.stdout is not None
        if self.proc.stdout.closed:
            return
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                data = b""
            if not data:
                break
            self._handle(data)
        self._ended()

    def _ended(self) -> None:
        """The engine process exited after stop(): let go of its pipes, fail what it left unanswered."""
        self._detach()
        self._fail_all(Unavailable("the server is shutting down"))

    def _detach(self) -> None:
        if self._loop is not None and self.proc.stdout is not None and not self.proc.stdout.closed:
            self._loop.remove_reader(self.proc.stdout.fileno())
            self.proc.stdout.close()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            if self._writing and self._loop is not None:
                self._loop.remove_writer(self.proc.stdin.fileno())
            self.proc.stdin.close()
        self._outgoing.clear()
        self._writing = False

    # ---- requests --------------------------------------------------------------------------------
    def _check_running(self) -> None:
        if not self.running:
            if self._lost is not None:
                raise self._lost
            raise Unavailable("the engine is not running" if self._stopping else "the engine is restarting")

    def generate(self, prompt: np.ndarray, params: SamplingParams, max_chars: int,
                 stops: Sequence[str] = ()) -> Stream:
        self._check_running()
        sid = self._new_id()
        stream = Stream(prompt, params, max_chars, stops, self.vocab, key=sid, reader=self)
        self._streams[sid] = stream
        self._send(records.Generate(sid, prompt, dataclasses.replace(params, seed=stream.seed), max_chars,
                                    tuple(stops)))
        return stream

    async def predict(self, ids: np.ndarray, state: np.ndarray | None, last_only: bool = False) -> Result:
        result: Result = await self._job(ids, state, last_only, hidden=False)
        return result

    async def infer(self, ids: np.ndarray, state: np.ndarray) -> Result:
        return await self.predict(ids, state)  # a Predict record's Done carries every row of logits

    async def trace(self, ids: np.ndarray, state: np.ndarray | None) -> Traced:
        result: Traced = await self._job(ids, state, False, hidden=True)
        return result

    async def _job(self, ids: np.ndarray, state: np.ndarray | None, last_only: bool, hidden: bool) -> Any:
        self._check_running()
        assert self._loop is not None
        jid = self._new_id()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._jobs[jid] = future
        self._send(records.Predict(jid, ids, state, last_only, hidden))
        try:
            return await future
        finally:
            if self._jobs.pop(jid, None) is not None and self.running:  # no answer yet: the caller left
                self._send(records.Drop(jid), quiet=True)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # ---- what a Stream's consumer does (the stream's Reader) ----------------------------------------
    def progress(self, stream: Stream) -> None:
        self._send(records.Consumed(stream.key, stream.consumed), quiet=True)

    def closed(self, stream: Stream) -> None:
        """The consumer is gone: stop stepping the stream (a finished one is already forgotten)."""
        if self._streams.pop(stream.key, None) is not None and self.running:
            self._send(records.Cancel(stream.key), quiet=True)

    def _send(self, record: records.Record, quiet: bool = False) -> None:
        """One record to the engine process; Unavailable if it is gone (quiet: then say nothing). On the
        loop thread once started; before that (a blocking pipe) from anywhere."""
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            if quiet:
                return
            raise Unavailable("the engine process is gone")
        self._outgoing += records.encode(record)
        if not self._writing:
            self._flush(quiet)

    def _flush(self, quiet: bool = True) -> None:
        """Writes what the pipe takes now; the rest when the loop says the pipe has room again."""
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            return
        fd = stdin.fileno()
        try:
            while self._outgoing:
                del self._outgoing[:os.write(fd, self._outgoing)]
        except BlockingIOError:
            pass
        except OSError:  # the engine process is gone; reading its stdout will say so
            self._outgoing.clear()
            if not quiet:
                raise Unavailable("the engine process is gone") from None
        if self._loop is None:
            return
        if self._outgoing and not self._writing:
            self._loop.add_writer(fd, self._flush)
            self._writing = True
        elif not self._outgoing and self._writing:
            self._loop.remove_writer(fd)
            self._writing = False

    # ---- results ---------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        assert self.proc.stdout is not None
        try:
            data = os.read(self.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        if data:
            assert self._loop is not None
            self._progress = self._loop.time()
            self._handle(data)
        elif self._stopping:  # stop() ran in another thread: this is its end
            self._ended()
        else:
            self._died()

    def _handle(self, data: bytes) -> None:
        for record in self._reader.feed(data):
            if type(record) is records.Chars:
                self._chars(record)
            elif type(record) is records.Done:
                future = self._jobs.pop(record.job, None)
                if future is not None and not future.done():
                    future.set_result((record.logits, record.state) if record.hidden is None else
                                      (record.logits, record.state, record.hidden))
                else:  # computed for a caller that had gone
                    self._stats["unclaimed_results"] += 1
            elif type(record) is records.Failed:
                error = record.error.exception()
                streams = (self._streams.pop(key, None) for key in record.streams)
                _fail([s for s in streams if s is not None], error)
                jobs = (self._jobs.pop(key, None) for key in record.jobs)
                _reject([f for f in jobs if f is not None], error)

    def _chars(self, record: records.Chars) -> None:
        streams = self._streams
        wanted = {}
        if len(record.alternative_rows):  # before its character, as Stream.alternatives says
            wanted = {row: i for i, row in enumerate(record.alternative_rows)}
        rows = zip(record.streams, record.tokens, record.logprobs, record.finishes, strict=True)
        for row, (sid, token, logprob, finish) in enumerate(rows):
            stream = streams.get(sid)
            if stream is None:  # cancelled meanwhile
                continue
            if wanted and row in wanted:
                i = wanted[row]
                stream.push_alternatives(record.alternative_ids[i], record.alternative_logprobs[i])
            if finish:
                del streams[sid]
            if stream.push((token, logprob, _FINISH[finish])):  # on the loop already: wake it here
                stream.wake()
        metrics, sizes = self.metrics, record.batch_sizes
        for s, n in zip(record.step_seconds, sizes, strict=True):
            metrics.step_seconds.observe(s)
            metrics.batch_size.observe(n)
        self._stats["step_calls"] += len(sizes)
        self._stats["step_rows"] += sum(sizes)
        if record.characters:
            metrics.characters.inc(record.characters)
        if record.cancelled:
            metrics.cancelled_streams.inc(record.cancelled)
        if record.cache_bytes >= 0:  # the engine's prompt cache changed: rare, once per admission
            self._cache(record)

    def _cache(self, record: records.Chars) -> None:
        metrics = self.metrics
        for counter, value in ((metrics.prompt_cache_hits, record.cache_hits),
                               (metrics.prompt_cache_misses, record.cache_misses),
                               (metrics.prompt_cache_saved, record.cache_saved),
                               (metrics.prompt_cache_evictions, record.cache_evictions)):
            if value:
                counter.inc(value)
        metrics.prompt_cache_bytes.set(record.cache_bytes)

    def _fail_all(self, error: ServeError) -> None:
        streams, self._streams = list(self._streams.values()), {}
        _fail(streams, error)
        jobs, self._jobs = list(self._jobs.values()), {}
        _reject(jobs, error)

    def _died(self) -> None:
        """The engine process exited by itself, or the watchdog killed it: fail what was in flight,
        start another one."""
        status = self.proc.wait()
        if self._hung:
            why = f"the model process stopped making progress for {self.hang_seconds:g} s and was restarted"
        else:
            why = f"the model process exited unexpectedly (status {status})"
        log.error("%s; starting a new one", why)
        self._detach()
        self._state(EngineState.RESTARTING)
        self._fail_all(Unavailable(f"{why}; retry"))
        self._respawn(0)

    def _respawn(self, failures: int) -> None:
        assert self._loop is not None
        future = self._loop.run_in_executor(None, self._spawn)
        future.add_done_callback(lambda done: self._respawned(done, failures))

    def _respawned(self, done: asyncio.Future[tuple[subprocess.Popen[bytes], tuple[str, ModelSpec]]],
                   failures: int) -> None:
        if done.cancelled() or self._stopping:
            if not done.cancelled() and done.exception() is None:
                proc, _ = done.result()
                proc.kill()
                proc.wait()
            return
        error = done.exception()
        if error is not None:
            failures += 1
            if failures >= MAX_RESTARTS:
                log.error("the engine process could not be restarted (%s); giving up after %d attempts in a row",
                          error, failures)
                self._lost = EngineLost(f"the engine process could not be restarted: {failures} attempts in a "
                                        f"row failed, the last with: {error}")
                self._state(EngineState.FAILED)
                return
            delay = 0.5 * 2 ** (failures - 1)
            log.error("the engine process could not be restarted (%s); trying again in %.1f s", error, delay)
            assert self._loop is not None
            self._loop.call_later(delay, self._respawn, failures)
            return
        proc, _ = done.result()
        if self._stopping:
            proc.kill()
            proc.wait()
            return
        self.proc = proc
        self._hung = False
        self._stats["restarts"] += 1
        self._attach()
        log.info("the engine process is serving again")
        self._state(EngineState.SERVING)


def _fail(streams: list[Stream], error: BaseException) -> None:
    for stream in streams:
        stream.failure = error
        stream.wake()


def _reject(futures: list[asyncio.Future[Any]], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
