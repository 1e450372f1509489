"""The engine in a process of its own (--engine process, the default): the same Engine, no shared GIL.

Why: in one process the engine thread and the event loop take turns on one GIL. Measured on 2 cores
(bench/serve.py), at 64 streams the engine thread was off the CPU for half of every step waiting for
its turn, and even with the model call skipped one stream got only a third of the transport ceiling.
With the engine here the server process keeps only gRPC and delivery, and the two run side by side.

    server process                               engine process (python -m serve.process.proxy)
    ProcessEngine.generate/predict  -- stdin ->  read between steps by the Engine's step loop (one thread)
    Stream deques, waiters, futures <- stdout -- one CHARS record per step

The records are in serve/process/records.py. The engine process ignores SIGINT/SIGTERM (a terminal's Ctrl-C
reaches the whole process group; the server drains and then stops the engine) and exits when its
stdin closes, so it never outlives the server. If it dies, the server fails what was in flight with
UNAVAILABLE, starts a new one, and serves again once that is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from serve.engine import sampling
from serve.process import records as wire
from serve.engine.scheduler import _STOP, Engine, Finish, SamplingParams, Stream, _fail, _Job, _resolve
from serve.errors import DeviceError, EngineFailure, ModelError, ServeError, Unavailable
from serve.ops.metrics import Metrics
from serve.engine.runtime import ModelSpec, Runtime

log = logging.getLogger(__name__)

CHILD = [sys.executable, "-m", "serve.process.proxy"]  # bench/model_skipped.py swaps in its own
_FINISH = tuple(Finish)
_ERRORS: dict[str, type[ServeError]] = {cls.__name__: cls for cls in (EngineFailure, Unavailable, ModelError,
                                                                       DeviceError)}
START_TIMEOUT = 120.0


def _readable(fd: int, timeout: float | None) -> bool:
    """Whether fd has something to read within timeout seconds (None: wait). poll, not select: a busy
    server has more than 1024 descriptors open, and select cannot watch those."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))


def _error(name: str, *args: Any) -> ServeError:
    """The server-side exception for a (class name, constructor arguments) the engine process sent."""
    cls = _ERRORS.get(name, EngineFailure)
    try:
        return cls(*args)
    except TypeError:
        return EngineFailure(": ".join(map(str, args)))


def _as_record(error: BaseException) -> tuple[Any, ...]:
    """(class name, constructor arguments): what `_error` rebuilds on the server side."""
    if isinstance(error, ModelError):
        return type(error).__name__, str(error.path), error.problem
    return type(error).__name__, str(error)


# ---- server side ---------------------------------------------------------------------------------
class _RemoteStream(Stream):
    """A Generate stream whose characters come from the engine process: reports the reader's progress
    now and then (the engine parks streams a window ahead of their reader) and its end."""

    def __init__(self, owner: ProcessEngine, sid: int, *args: Any) -> None:
        super().__init__(*args)
        self._owner, self._sid = owner, sid

    def pop(self) -> tuple[int, float, Finish] | None:
        item = super().pop()
        if item is not None and not self.consumed % self._owner.report_every:
            self._owner._send(wire.CONSUMED, (self._sid, self.consumed), quiet=True)
        return item

    def close(self) -> None:
        if not self.cancelled:
            super().close()
            self._owner._forget(self._sid)


class ProcessEngine:
    """Engine's interface (start, stop, running, generate, predict, stats, spec, vocab) over a child
    process running the Engine. The model is loaded and checked there only: this process learns its
    spec and provider from the child's READY record, or gets the child's ModelError / DeviceError."""

    def __init__(self, model: str, device: str = "auto", threads: int = 1, max_batch: int = 256,
                 max_delay_us: int = 200, window: int = 1024, metrics: Metrics | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.metrics = metrics if metrics is not None else Metrics()
        self.stats = {"step_calls": 0, "step_rows": 0, "restarts": 0}
        # The engine parks a stream `window` ahead of what it knows was read and lets it rejoin at half
        # that. Reports every quarter window keep its knowledge under a quarter behind, so a reader who
        # caught up and waits is always within half a window: the stream rejoins, whatever the window.
        self.report_every = max(1, window // 4)
        self._argv = [*CHILD, "--model", model, "--device", device, "--threads", str(threads), "--max-batch",
                      str(max_batch), "--max-delay-us", str(max_delay_us), "--window", str(window)]
        self._streams: dict[int, _RemoteStream] = {}
        self._jobs: dict[int, asyncio.Future[tuple[np.ndarray, np.ndarray]]] = {}
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Records for the engine process wait here while its stdin pipe is full. The loop must never
        # block on that pipe: the engine process blocks on its own stdout until the loop reads it.
        self._outgoing = bytearray()
        self._writing = False  # add_writer is set
        self.proc, (self.provider, self.spec) = self._spawn()
        self.vocab = self.spec.vocab

    def _spawn(self) -> tuple[subprocess.Popen[bytes], tuple[str, ModelSpec]]:
        """Starts an engine process and waits for its READY (or the error that stopped it).

        Its own session: a terminal's Ctrl-C goes to the server, which stops the engine when it is done."""
        proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                start_new_session=True)
        assert proc.stdout is not None
        self._reader = wire.Reader()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                ready = _readable(proc.stdout.fileno(), max(0.0, deadline - time.monotonic()))
                data = os.read(proc.stdout.fileno(), 1 << 16) if ready else b""
                if not data:
                    break
                for kind, payload in self._reader.feed(data):
                    if kind == wire.READY:
                        return proc, pickle.loads(payload)
                    if kind == wire.ERROR:
                        proc.wait(timeout=10)
                        raise _error(*pickle.loads(payload))
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
                self._loop.call_soon_threadsafe(self._send, wire.STOP, reason, True)
            except RuntimeError:  # the loop is closed: nobody can send; end it the hard way below
                self.proc.kill()
        else:
            self._send(wire.STOP, reason, quiet=True)
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
        if _readable(self.proc.stdout.fileno(), timeout):
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
            raise Unavailable("the engine is not running" if self._stopping else "the engine is restarting")

    def generate(self, prompt: np.ndarray, params: SamplingParams, max_chars: int,
                 stops: Sequence[str] = ()) -> Stream:
        self._check_running()
        sid = self._new_id()
        stream = _RemoteStream(self, sid, prompt, params, max_chars, stops, self.vocab)
        self._streams[sid] = stream
        self._send(wire.GENERATE, (sid, prompt, SamplingParams(params.temperature, params.top_k, params.top_p,
                                                               stream.seed), max_chars, tuple(stops)))
        return stream

    async def predict(self, ids: np.ndarray, state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        self._check_running()
        assert self._loop is not None
        jid = self._new_id()
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = self._loop.create_future()
        self._jobs[jid] = future
        self._send(wire.JOB, (jid, ids, state))
        try:
            return await future
        finally:
            self._jobs.pop(jid, None)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _forget(self, sid: int) -> None:
        """The consumer is gone: stop stepping the stream (a finished one is already forgotten)."""
        if self._streams.pop(sid, None) is not None and self.running:
            self._send(wire.CANCEL, sid, quiet=True)

    def _send(self, kind: bytes, message: Any, quiet: bool = False) -> None:
        """One record to the engine process; Unavailable if it is gone (quiet: then say nothing). On the
        loop thread once started; before that (a blocking pipe) from anywhere."""
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            if quiet:
                return
            raise Unavailable("the engine process is gone")
        self._outgoing += wire.frame(kind, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
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
            self._handle(data)
        elif self._stopping:  # stop() ran in another thread: this is its end
            self._ended()
        else:
            self._died()

    def _handle(self, data: bytes) -> None:
        for kind, payload in self._reader.feed(data):
            if kind == wire.CHARS:
                self._chars(payload)
            elif kind == wire.DONE:
                jid, logits, state = pickle.loads(payload)
                future = self._jobs.pop(jid, None)
                if future is not None and not future.done():
                    future.set_result((logits, state))
            elif kind == wire.FAILED:
                streams, jobs, name, message = pickle.loads(payload)
                for sid in streams:
                    stream = self._streams.pop(sid, None)
                    if stream is not None:
                        _fail([(stream, _error(name, message))])
                _resolve([(self._jobs.pop(jid), None, _error(name, message)) for jid in jobs if jid in self._jobs])

    def _chars(self, payload: bytes) -> None:
        sids, tokens, logprobs, finishes, seconds, sizes, characters, cancelled = wire.unpack_chars(payload)
        streams = self._streams
        for sid, token, logprob, finish in zip(sids, tokens, logprobs, finishes):
            stream = streams.get(sid)
            if stream is None:  # cancelled meanwhile
                continue
            if finish:
                del streams[sid]
            if stream.push((token, logprob, _FINISH[finish])):  # on the loop already: wake it here
                stream.wake()
        metrics = self.metrics
        for s, n in zip(seconds, sizes):
            metrics.step_seconds.observe(s)
            metrics.batch_size.observe(n)
        self.stats["step_calls"] += len(sizes)
        self.stats["step_rows"] += sum(sizes)
        if characters:
            metrics.characters.inc(characters)
        if cancelled:
            metrics.cancelled_streams.inc(cancelled)

    def _fail_all(self, error: ServeError) -> None:
        streams, self._streams = list(self._streams.values()), {}
        _fail([(s, error) for s in streams])
        jobs, self._jobs = list(self._jobs.values()), {}
        _resolve([(f, None, error) for f in jobs])

    def _died(self) -> None:
        """The engine process exited by itself: fail what was in flight, start another one."""
        status = self.proc.wait()
        log.error("the engine process exited unexpectedly (status %s); starting a new one", status)
        self._detach()
        self._fail_all(Unavailable(f"the model process exited unexpectedly (status {status}); retry"))
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
        if done.exception() is not None:
            delay = min(30.0, 0.5 * 2 ** failures)  # keep trying: the model file may come back
            log.error("the engine process could not be restarted (%s); trying again in %.1f s",
                      done.exception(), delay)
            assert self._loop is not None
            self._loop.call_later(delay, self._respawn, failures + 1)
            return
        proc, _ = done.result()
        if self._stopping:
            proc.kill()
            proc.wait()
            return
        self.proc = proc
        self.stats["restarts"] += 1
        self._attach()
        log.info("the engine process is serving again")


# ---- engine side ---------------------------------------------------------------------------------
class _Tally:
    """Stands in for Metrics inside the engine process: collects what the server's metrics should
    count and ships it with the next CHARS record."""

    def __init__(self) -> None:
        self.characters = _Counter()
        self.cancelled_streams = _Counter()
        self.step_seconds = _Series()
        self.batch_size = _Series()


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class _Series:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


class _RemoteFuture:
    """A job's handle inside the engine process: results go back by id."""

    def __init__(self, jid: int) -> None:
        self.jid = jid

    def cancelled(self) -> bool:
        return False


def _stopped(items: list[Any]) -> bool:
    return any(item is _STOP for item in items)


class _ChildEngine(Engine):
    """The Engine reading the server's records from `inp` and writing its deliveries as records on `out`."""

    def __init__(self, runtime: Runtime, inp: int, out: int, **kwargs: Any) -> None:
        self.tally = _Tally()
        super().__init__(runtime, metrics=self.tally, **kwargs)  # type: ignore[arg-type]
        self._in, self._out = inp, out
        self._requests = wire.Reader()
        self._streams: dict[int, Stream] = {}

    # The server's records are read here, between steps, by the one thread that steps: a reader thread
    # would take turns with it on the GIL, and made 64 streams arriving together wait 3 times longer
    # for their first character.
    def _receive(self, wait: float | None, idle: bool) -> list[Any]:
        """What arrived: waits up to `wait` seconds (None: until something comes) for the first records;
        when idle, up to --max-delay-us more for concurrent arrivals (see Engine._receive)."""
        got, items = self._read(wait)
        if got and idle and self.max_delay > 0:
            deadline = time.perf_counter() + self.max_delay
            while len(items) < self.max_batch and not _stopped(items):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                got, more = self._read(left)
                items += more
                if not got:
                    break
        while got and not _stopped(items):
            got, more = self._read(0.0)
            items += more
        return items

    def _read(self, timeout: float | None) -> tuple[bool, list[Any]]:
        """(whether anything came, the inbox items it held); progress and cancellations are applied."""
        if not _readable(self._in, timeout):
            return False, []
        try:
            data = os.read(self._in, 1 << 20)
        except OSError:
            data = b""
        if not data:  # the server is gone: stop
            self._stop_reason = "the server process exited"
            self._stopping = True
            return True, [_STOP]
        items: list[Any] = []
        streams = self._streams
        for kind, payload in self._requests.feed(data):
            message = pickle.loads(payload)
            if kind == wire.GENERATE:
                sid, prompt, params, max_chars, stops = message
                stream = Stream(prompt, params, max_chars, stops, self.vocab)
                stream.sid = sid  # type: ignore[attr-defined]
                streams[sid] = stream
                items.append(stream)
            elif kind == wire.CONSUMED:
                sid, consumed = message
                stream = streams.get(sid)
                if stream is not None:
                    stream.consumed = consumed
            elif kind == wire.CANCEL:
                stream = streams.pop(message, None)
                if stream is not None:
                    stream.cancelled = True
            elif kind == wire.JOB:
                jid, ids, state = message
                items.append(_Job(ids, state, _RemoteFuture(jid)))  # type: ignore[arg-type]
            elif kind == wire.STOP:
                self._stop_reason = message
                self._stopping = True
                items.append(_STOP)
        return True, items

    def write(self, record: bytes) -> None:
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._out, view):]
        except OSError:  # the server is gone; the next read of stdin (EOF) stops the engine
            pass

    def _step(self, riders: list[_Job] | None = None) -> bool:
        stepped = super()._step(riders)
        self._flush_tally()
        return stepped

    def _admit(self, fresh: list[Stream]) -> None:
        super()._admit(fresh)
        self._flush_tally()

    def _flush_tally(self) -> None:
        """Metric updates that no CHARS record carried (a step where every stream was cancelled)."""
        tally = self.tally
        if tally.characters.value or tally.cancelled_streams.value or tally.step_seconds.values:
            self._send_chars([], np.empty(0), np.empty(0), [])

    def _send_chars(self, rows: list[Stream], tokens: np.ndarray, logprobs: np.ndarray, finishes: list[Finish]) -> None:
        tally = self.tally
        self.write(wire.pack_chars([s.sid for s in rows], tokens, logprobs, finishes,  # type: ignore[attr-defined]
                                   tally.step_seconds.values, tally.batch_size.values, tally.characters.value,
                                   tally.cancelled_streams.value))
        tally.step_seconds.values, tally.batch_size.values = [], []
        tally.characters.value = tally.cancelled_streams.value = 0

    def _sample_and_deliver(self, rows: list[Stream], logits: np.ndarray, params: sampling.RowParams,
                            uniforms: np.ndarray) -> bool:
        tokens, logprobs = sampling.sample(logits, params, uniforms)
        finishes = [s.emitted(t) for s, t in zip(rows, tokens.tolist())]
        ended = any(finishes)
        if ended:
            for s in rows:
                if s.done:
                    self._streams.pop(s.sid, None)  # type: ignore[attr-defined]
        self._send_chars(rows, tokens, logprobs, finishes)
        return ended

    def _post(self, callback: Any, payload: list[Any]) -> None:
        if callback is _resolve:
            for future, value, error in payload:
                if error is None:
                    logits, state = value
                    self.write(wire.frame(wire.DONE, pickle.dumps((future.jid, logits, state),
                                                                  protocol=pickle.HIGHEST_PROTOCOL)))
                else:
                    self._failed([], [future.jid], error)
        elif callback is _fail:
            by_error: dict[int, tuple[list[int], BaseException]] = {}
            for stream, error in payload:
                self._streams.pop(stream.sid, None)
                by_error.setdefault(id(error), ([], error))[0].append(stream.sid)
            for sids, error in by_error.values():
                self._failed(sids, [], error)

    def _failed(self, sids: list[int], jids: list[int], error: BaseException) -> None:
        self.write(wire.frame(wire.FAILED, pickle.dumps((sids, jids, type(error).__name__, str(error)))))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="charrnn's engine process; started by `python -m serve`, talks "
                                            "records (serve/process/records.py) on stdin and stdout")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-delay-us", type=int, default=200)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the server decides when the engine stops
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s engine: %(name)s: %(message)s")
    out = os.dup(1)
    os.dup2(2, 1)  # stdout carries records only: anything printed goes to stderr
    inp = sys.stdin.buffer.fileno()
    try:
        runtime = Runtime(args.model, args.device, args.threads)
    except (ModelError, DeviceError) as error:
        os.write(out, wire.frame(wire.ERROR, pickle.dumps(_as_record(error))))
        return 2
    engine = _ChildEngine(runtime, inp, out, max_batch=args.max_batch, max_delay_us=args.max_delay_us,
                          window=args.window)
    engine.write(wire.frame(wire.READY, pickle.dumps((runtime.provider, runtime.spec))))
    engine._run()  # returns after STOP (or the server's exit), having failed what was left
    engine._flush_tally()  # the streams cut at shutdown count as cancelled
    return 0


if __name__ == "__main__":
    sys.exit(main())
