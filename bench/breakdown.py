"""Where each generated character's server CPU goes: the onnxruntime call, sampling, the engine hop,
the event loop, gRPC/protobuf and the rest, for 1 and 64 streams, with the engine process (the
default) and with --engine thread, side by side in one run (issue 23).

    .venv/bin/python bench/breakdown.py                      # GRU 2x256 vocab 65 (random weights)
    .venv/bin/python bench/breakdown.py --rounds 3 --streams 1,64 --engines process,thread
    git worktree add /tmp/before 651bf6a && .venv/bin/python bench/breakdown.py --before /tmp/before --engines process

Method. Every server runs every load twice, from a separate client process (bench/load.py):
  1. unobserved: the characters per second and the CPU seconds of each of the server's processes
     (from /proc), divided by the characters delivered: CPU microseconds per character;
  2. under py-spy (`record --native --subprocesses`, sampling every thread of the server and its
     engine process with their C frames): which code each process was on when it was on the CPU.
Each process's CPU per character (pass 1) is shared out over its buckets in proportion to its samples
(pass 2). A sampler that pauses the process slows it, so pass 2 gives only the shares; samples that
caught a thread blocked in the kernel waiting for work (epoll, poll, futex, condition variables) are idle,
not CPU, and are dropped (see IDLE). A sample belongs to the first bucket that its innermost frames name:

  onnxruntime    serve/engine/runtime.py's call into onnxruntime, onnxruntime's own frames
  sampling       serve/engine/sampling.py (the per-row random draws included)
  scheduler      serve/engine/scheduler.py, stream.py, prefill.py: the engine's own bookkeeping
  engine hop     serve/process/ (records encoded, piped, decoded, both directions) and
                 serve/engine/thread.py (the thread engine's hand-over to the event loop)
  metrics        prometheus_client and serve/ops/metrics.py
  gRPC/protobuf  grpc's Python and C-core frames, protobuf, serve/api/grpc/ (the servicer)
  service        serve/service/ (validation, text <-> ids), the interceptors' policies
  event loop     asyncio, uvloop, the coroutines' scheduling
  gc             Python's cyclic garbage collector
  other          everything else (the interpreter between frames, unnamed C frames)

With --before CHECKOUT, every server is measured a second time from that checkout of this repository (e.g.
the commit before a change), in the same run: its columns say "before".

A cross-check that needs no sampler: "ort step (wall)" is the server's own count of the seconds inside its
onnxruntime step calls (charrnn_step_seconds, from --metrics-port) per character, wall clock around the call,
so it also holds the time the engine was preempted there or, with --engine thread, waited for the GIL on its
way out. Where it and the sampled "onnxruntime" row part (the thread engine at one stream), the sampler lost
native frames: py-spy cannot always unwind onnxruntime's kernels.

The client's CPU per character is printed beside the server's: on 2 cores the three processes (client,
server, engine) share the machine, so every microsecond anywhere is a microsecond less for the others.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# harness puts the repository root on sys.path
from harness import ROOT, ServerProcess, build_model, load, measure

BUCKETS = ("onnxruntime", "sampling", "scheduler", "engine hop", "metrics", "gRPC/protobuf", "service",
           "event loop", "gc", "other")

# A frame's text (py-spy's "function (file:line)" or "0xADDR (library)") -> its bucket; the first rule
# that matches the innermost frame naming one wins.
RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((bucket, re.compile(pattern)) for bucket, pattern in (
    ("gc", r"gc_collect|collect_main|\bgc_collect"),
    ("onnxruntime", r"onnxruntime|Runtime\.run|Runtime\.step"),
    ("sampling", r"serve/engine/sampling\.py"),
    ("engine hop", r"serve/process/|serve/engine/thread\.py"),
    ("metrics", r"prometheus_client|serve/ops/metrics\.py"),
    ("gRPC/protobuf", r"grpc|protobuf|_pb2|serve/api/grpc/servicer\.py"),
    ("scheduler", r"serve/engine/(scheduler|stream|prefill|prompt_cache)\.py"),
    ("service", r"serve/service/|serve/api/"),
    ("event loop", r"asyncio|uvloop|_asynciomodule|loop\.c|selectors\.py|Runner\.run|events\.py"),
))
# The innermost frame of a thread that sleeps in the kernel until there is work: not CPU time. py-spy pauses
# the process to sample it, so it cannot tell a sleeping thread from a running one by its state. A libc
# frame without a name is one of libc's internal futex waits (a lock, a condition, the GIL): the functions
# that do work there (memcpy, malloc, write, sendmsg...) have names.
IDLE = re.compile(r"^(epoll_wait|epoll_pwait|poll|ppoll|select|pselect6?|__select|nanosleep|clock_nanosleep|"
                  r"pthread_cond_wait|pthread_cond_timedwait|sem_wait|sem_timedwait|syscall|futex_wait|"
                  r"__futex_abstimed_wait\w*|do_futex_wait\w*|readable) |^0x[0-9a-f]+ \(libc\.so[.0-9]*\)$")


def bucket_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for bucket, rule in RULES:
            if rule.search(frame):
                return bucket
    return "other"


def parse(raw: str) -> dict[str, collections.Counter[str]]:
    """py-spy's raw output (`frame;frame;... count` per line, the process frames first) -> per process
    role ("server" or "engine"), the non-idle samples per bucket."""
    shares: dict[str, collections.Counter[str]] = {"server": collections.Counter(), "engine": collections.Counter()}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not code or IDLE.match(code[-1]):
            continue
        role = "engine" if any(f.startswith("process ") and "serve.process.child" in f for f in frames) else "server"
        shares[role][bucket_of(code)] += int(count)
    return shares


def step_seconds(metrics_url: str) -> float:
    """The server's own count of seconds spent in onnxruntime step calls (charrnn_step_seconds_sum)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^charrnn_step_seconds_sum(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def profile(pyspy: str, server: ServerProcess, streams: int, chars: int, rate: int) -> str:
    """Pass 2: one load under py-spy; its raw samples."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        spy = subprocess.Popen([pyspy, "record", "--pid", str(server.pid), "--subprocesses", "--native",
                                "--threads", "--rate", str(rate), "--format", "raw", "--output", out.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # py-spy attaches to every process of the tree
        try:
            load(server.target, streams, chars)
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
            _, err = spy.communicate(timeout=60)
        raw = Path(out.name).read_text()
        if not raw.strip():
            raise RuntimeError(f"py-spy recorded nothing: {err.strip()[-500:]} (it needs ptrace: root, or "
                               "/proc/sys/kernel/yama/ptrace_scope 0)")
        return raw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256 vocab 65)")
    p.add_argument("--hidden", type=int, default=256, help="the built model's hidden size")
    p.add_argument("--streams", default="1,64", help="comma-separated stream counts")
    p.add_argument("--chars", type=int, default=20_000,
                   help="characters in all per load (split over the streams): ~2-5 s at 1 stream")
    p.add_argument("--engines", default="process,thread", help="comma-separated: process, thread")
    p.add_argument("--rounds", type=int, default=1, help="unobserved passes per load (medians)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--before", type=Path, help="another checkout of this repository: its servers too, as 'before'")
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(pyspy):
        print("py-spy not found: `make install` puts it in .venv (requirements/dev.txt)", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.streams.split(",")]
    checkouts = [("", ROOT)] + ([(" before", args.before.resolve())] if args.before else [])
    engines = [(engine + label, engine, cwd) for engine in args.engines.split(",") for label, cwd in checkouts]
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-breakdown-") as tmp:
        model = args.model or build_model(Path(tmp), hidden=args.hidden)[0]
        for name, engine, cwd in engines:
            server = ServerProcess(name, [sys.executable, "-m", "serve", "--model", str(model), "--device", "cpu",
                                          "--port", "0", "--http-port", "-1", "--engine", engine,
                                          "--metrics-port", "0", "--log-level", "WARNING"], cwd=cwd)
            try:
                assert server.proc.stdout is not None
                metrics = re.search(r"charrnn metrics on (\S+)", server.proc.stdout.readline())
                assert metrics, f"{name}: no metrics line"
                for streams in counts:
                    per_stream = max(1, args.chars // streams)
                    load(server.target, streams, min(per_stream, 50))  # warm-up
                    rounds = []
                    for _ in range(args.rounds):
                        before = step_seconds(metrics.group(1))
                        result = measure(server, streams, per_stream, 1)
                        result["step_us"] = (step_seconds(metrics.group(1)) - before) / max(result["chars"], 1) * 1e6
                        rounds.append(result)
                    raw = profile(pyspy, server, streams, per_stream, args.rate)
                    results[(name, streams)] = {"rounds": rounds, "shares": parse(raw)}
                    print(f"{name}, {streams} streams: done", file=sys.stderr, flush=True)
            finally:
                server.stop()

    print(f"cpus {os.cpu_count()}; model {args.model or f'GRU 2x{args.hidden} vocab 65'}; "
          f"{args.chars} chars per load; {args.rounds} unobserved rounds (medians); py-spy at {args.rate}/s")
    print("server CPU microseconds per character, by where it went (engine process + server process):\n")
    columns = [(name, streams) for name, _, _ in engines for streams in counts]
    print(f"{'':16}" + "".join(f"{e.split()[0] + ' x' + str(n):>16}" for e, n in columns))
    if args.before:
        print(f"{'':16}" + "".join(f"{'(before)' if e.endswith('before') else '':>16}" for e, _ in columns))

    def med(key: tuple[str, int], field: str) -> float:
        values = [r[field] for r in results[key]["rounds"] if r.get(field) is not None]
        return statistics.median(values) if values else 0.0

    split: dict[tuple[str, int], dict[str, float]] = {}
    for key in columns:
        server_us, engine_us = med(key, "server_us"), med(key, "engine_us")
        per_role = {"engine": engine_us, "server": server_us - engine_us}
        split[key] = collections.Counter()
        for role, us in per_role.items():
            samples = results[key]["shares"][role]
            total = sum(samples.values())
            for bucket, n in samples.items():
                split[key][bucket] += us * n / total if total else 0.0
    for bucket in BUCKETS:
        print(f"{bucket:16}" + "".join(f"{split[key].get(bucket, 0.0):16.1f}" for key in columns))
    print(f"{'= server':16}" + "".join(f"{med(key, 'server_us'):16.1f}" for key in columns))
    print(f"{'  engine process':16}" + "".join(f"{med(key, 'engine_us'):16.1f}" if key[0].startswith("process")
                                                 else f"{'(in server)':>16}" for key in columns))
    print(f"{'ort step (wall)':16}" + "".join(f"{med(key, 'step_us'):16.1f}" for key in columns))
    print(f"{'client':16}" + "".join(f"{med(key, 'client_us'):16.1f}" for key in columns))
    print(f"{'chars/s':16}" + "".join(f"{med(key, 'chars_per_s'):16.0f}" for key in columns))
    print(f"{'ttfc p50 ms':16}" + "".join(f"{med(key, 'ttfc_p50_ms'):16.2f}" for key in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
