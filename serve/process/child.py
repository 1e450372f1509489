"""The engine process (`python -m serve.process.child`, started by serve/process/proxy.py): the
Scheduler of serve/engine/, its inbox the server's records on stdin, its sink records on stdout.

The server's records are read between steps, by the one thread that steps: a reader thread would take
turns with it on the GIL, and made 64 streams arriving together wait 3 times longer for their first
character. It ignores SIGINT/SIGTERM (the server decides when the engine stops) and stops when its
stdin closes, so it never outlives the server.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import numpy as np

from serve.engine.prompt_cache import MB
from serve.engine.protocol import Finish
from serve.engine.runtime import Runtime
from serve.engine.scheduler import Alternatives, JobOutcome, Scheduler, Work
from serve.engine.stream import Job, Stop, Stream
from serve.errors import DeviceError, ModelError
from serve.process import records
from serve.process.pipe import readable


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += int(amount)


class _Series:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float) -> None:
        self.values.append(amount)


class _Level:
    def __init__(self) -> None:
        self.value = -1  # -1: not set since the last take

    def set(self, value: float) -> None:
        self.value = int(value)


class Tally:
    """The scheduler's StepMetrics in this process: what the server's metrics should count, shipped
    with the next Chars record."""

    def __init__(self) -> None:
        self.characters = _Counter()
        self.cancelled_streams = _Counter()
        self.step_seconds = _Series()
        self.batch_size = _Series()
        self.prompt_cache_hits = _Counter()
        self.prompt_cache_misses = _Counter()
        self.prompt_cache_saved = _Counter()
        self.prompt_cache_evictions = _Counter()
        self.prompt_cache_bytes = _Level()
        self._counters = (self.characters, self.cancelled_streams, self.prompt_cache_hits, self.prompt_cache_misses,
                          self.prompt_cache_saved, self.prompt_cache_evictions)

    def pending(self) -> bool:
        return bool(any(c.value for c in self._counters) or self.step_seconds.values
                    or self.prompt_cache_bytes.value >= 0)

    def take(self) -> tuple[list[float], list[int], int, int, int, int, int, int, int]:
        """Chars' fields after the tokens, counted since the last take: step seconds, batch sizes,
        characters, cancelled streams, the prompt cache's hits, misses, characters saved, evictions,
        and the bytes it holds (-1: not set since)."""
        taken = (self.step_seconds.values, [int(n) for n in self.batch_size.values], self.characters.value,
                 self.cancelled_streams.value, self.prompt_cache_hits.value, self.prompt_cache_misses.value,
                 self.prompt_cache_saved.value, self.prompt_cache_evictions.value, self.prompt_cache_bytes.value)
        self.step_seconds.values, self.batch_size.values = [], []
        for c in self._counters:
            c.value = 0
        self.prompt_cache_bytes.value = -1
        return taken


class InFlight:
    """The streams and jobs the server may still name, by key: the inbox adds them, the sink forgets
    those it has answered for good."""

    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self.jobs: dict[int, Job] = {}


class PipeInbox:
    """The server's records from `fd`, turned into work; progress, cancellations and dropped jobs are
    applied to what they name as they arrive."""

    def __init__(self, fd: int, vocab: Sequence[str], live: InFlight, reader: records.Reader) -> None:
        self._fd = fd
        self._vocab = vocab
        self._reader = reader
        self._live = live

    def get(self, timeout: float | None) -> list[Work] | None:
        if not readable(self._fd, timeout):
            return None
        try:
            data = os.read(self._fd, 1 << 20)
        except OSError:
            data = b""
        if not data:  # the server is gone
            return [Stop("the server process exited")]
        items: list[Work] = []
        streams, jobs = self._live.streams, self._live.jobs
        for record in self._reader.feed(data):
            if type(record) is records.Consumed:
                stream = streams.get(record.stream)
                if stream is not None:
                    stream.consumed = record.consumed
            elif type(record) is records.Generate:
                stream = Stream(record.prompt, record.params, record.max_chars, record.stops, self._vocab,
                                key=record.stream)
                streams[record.stream] = stream
                items.append(stream)
            elif type(record) is records.Cancel:
                cancelled = streams.pop(record.stream, None)
                if cancelled is not None:
                    cancelled.cancelled = True
            elif type(record) is records.Predict:
                job = jobs[record.job] = Job(record.ids, record.state, key=record.job, last_only=record.last_only,
                                                hidden=record.hidden)
                items.append(job)
            elif type(record) is records.Drop:
                dropped = jobs.pop(record.job, None)
                if dropped is not None:  # not computed yet: the scheduler leaves it out of its call
                    dropped.dropped = True
            elif type(record) is records.Stop:
                items.append(Stop(record.reason))
        return items

    def leftovers(self) -> list[Work]:
        return []  # nothing waits behind a Stop: the server sends nothing after it


# How long characters that nobody waits for urgently may be held back to share one write (seconds). At one
# stream, 2 ms (about 8 steps) served 1.2x the characters per second of no holding (bench/serve.py --before,
# 5 rounds; 1 ms: 1.19x) with the gaps' p99 at 1 to 1.7 ms; steps of many streams take longer than this.
HOLD = 0.002


class PipeSink:
    """The scheduler's output as records on `fd`.

    Characters may be held back for up to HOLD seconds while the scheduler goes on stepping, so that one
    stream stepped alone (a step every ~0.2 ms) is handed over a few characters per write rather than one:
    each write wakes the server process, whose every wake-up and hand-over to a handler cost more than
    the step itself (bench/breakdown.py). A stream's first character and its last, every job's result and
    failure, and everything once the scheduler waits for work, go at once."""

    def __init__(self, fd: int, tally: Tally, live: InFlight) -> None:
        self._fd = fd
        self._tally = tally
        self._streams, self._jobs = live.streams, live.jobs
        self._held = bytearray()
        self._held_since = 0.0
        self._last_flush = 0.0

    def _send(self, data: bytes, urgent: bool = True) -> None:
        """Writes data after whatever is held; or, not urgent, holds it with the rest."""
        if not urgent:
            if not self._held:
                self._held_since = time.perf_counter()
            self._held += data
            return
        if self._held:
            data, self._held = bytes(self._held) + data, bytearray()
        self.write(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:  # the server is gone; the next read of stdin (EOF) stops the engine
            pass

    def chars(self, rows: list[Stream], tokens: list[int], logprobs: np.ndarray, finishes: list[Finish],
              alternatives: Alternatives | None = None) -> None:
        if any(finishes):
            for s in rows:
                if s.done:
                    self._streams.pop(s.key, None)
        record = records.Chars([s.key for s in rows], tokens, logprobs, list(finishes), *self._tally.take())
        if alternatives is not None:
            record = record._replace(alternative_rows=alternatives[0], alternative_ids=alternatives[1],
                                     alternative_logprobs=alternatives[2])
        # a first character (time to first character) or a last one (the call's end) goes at once
        self._send(records.encode(record), urgent=any(finishes) or any(s.produced == 1 for s in rows))

    def results(self, outcomes: list[JobOutcome]) -> None:
        for job, value, error in outcomes:
            self._jobs.pop(job.key, None)
            if error is None:
                assert value is not None
                self._send(records.encode(records.Done(job.key, *value)))
            else:
                self._send(records.encode(records.Failed([], [job.key], records.Failure.of(error))))

    def failed(self, streams: list[Stream], error: BaseException) -> None:
        if not streams:
            return
        for s in streams:
            self._streams.pop(s.key, None)
        self._send(records.encode(records.Failed([s.key for s in streams], [], records.Failure.of(error))))

    def flush(self, hold: bool) -> None:
        """Metric updates that no Chars record carried (a step where every stream was cancelled), then what
        is held: unless hold, all of it; with hold, once the oldest would otherwise wait past HOLD seconds."""
        if self._tally.pending():
            self.chars([], [], np.empty(0), [])
        now = time.perf_counter()
        iteration, self._last_flush = now - self._last_flush, now
        # held until the next flush, the oldest would wait about one iteration more: send it now if that
        # takes it past HOLD (a batch of 64 streams steps for ~1.5 ms: its characters are never held)
        if self._held and (not hold or now - self._held_since + iteration >= HOLD):
            self._send(b"")

    def alive(self) -> None:
        """An empty Chars record: the server's watchdog sees the engine process at work."""
        self.chars([], [], np.empty(0), [])
        self._send(b"")


def read_model(fd: int, reader: records.Reader) -> bytes | None:
    """The Model record the server sends first; None if the server went away before sending it."""
    while True:
        data = os.read(fd, 1 << 20)
        if not data:
            return None
        got = reader.feed(data)
        if got:
            assert type(got[0]) is records.Model and len(got) == 1, got
            return got[0].data


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="charrnn's engine process; started by `python -m serve`, talks "
                                            "records (serve/process/records.py) on stdin and stdout")
    p.add_argument("--model", required=True, help="the model's path, for messages: its bytes come on stdin")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-delay-us", type=int, default=200)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--prompt-cache-mb", type=int, default=0)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the server decides when the engine stops
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s engine: %(name)s: %(message)s")
    out = os.dup(1)
    os.dup2(2, 1)  # stdout carries records only: anything printed goes to stderr
    inp = sys.stdin.buffer.fileno()
    reader = records.Reader()
    data = read_model(inp, reader)
    if data is None:
        return 0
    try:
        runtime = Runtime(args.model, args.device, args.threads, data=data)
    except (ModelError, DeviceError) as error:
        os.write(out, records.encode(records.StartFailed(records.Failure.of(error))))
        return 2
    tally, live = Tally(), InFlight()
    sink = PipeSink(out, tally, live)
    scheduler = Scheduler(runtime, PipeInbox(inp, runtime.spec.vocab, live, reader), sink, tally,
                          max_batch=args.max_batch, max_delay_us=args.max_delay_us, window=args.window,
                          prompt_cache_bytes=args.prompt_cache_mb * MB)
    gc.freeze()  # the model, the session, the modules stay for good: collections skip them (serve/ops/server.py)
    sink.write(records.encode(records.Ready(runtime.provider, runtime.spec)))
    scheduler.run()  # returns after Stop (or the server's exit), having failed what was left
    return 0


if __name__ == "__main__":
    sys.exit(main())
