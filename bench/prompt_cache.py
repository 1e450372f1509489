"""Prompt state cache benchmark: one server with the cache, the same build without it
(--prompt-cache-mb 0), side by side in one run (issue 21).

    .venv/bin/python bench/prompt_cache.py                  # GRU 2x256 vocab 65 (random weights), 3 rounds
    .venv/bin/python bench/prompt_cache.py --rounds 1 --total-chars 20000   # a quicker look

Loads (every round runs each against both servers, the order alternating; medians over rounds):
  (a) a growing conversation: call k (k = 1..calls) is a Generate of 1 character whose prompt is the
      first total*k/calls characters of a fixed text; the time to the first character of the last call,
      and the server's CPU seconds (every process of it: the engine process too) over the calls.
  (b) `streams` concurrent Generates whose prompts share a `prefix`-character prefix that the server saw
      once just before (one Generate of it alone), and differ in their last 20: median time to first char.
  (c) nothing hits: `streams` concurrent Generates of `chars` characters after new `short`-character
      prompts: characters per second.
Every round uses texts of its own, so a round finds nothing of the one before in the cache. Speed
does not depend on the weights, so by default a freshly initialised model is exported to a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

# harness puts the repository root on sys.path
from harness import VOCAB_65, ServerProcess, build_model, cpu_seconds

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc

SERVERS = ("cache off", "cache on")


def text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(VOCAB_65[1:], size=n))  # no newline: any character would do


async def first_char(stub: pb_grpc.CharRNNStub, prompt: str, max_chars: int = 1) -> tuple[float, int]:
    """(seconds to the first character, characters received)."""
    start = time.perf_counter()
    first, received = 0.0, 0
    async for _ in stub.Generate(pb.GenerateRequest(prompt=prompt, max_chars=max_chars, seed=received + 1),
                                 timeout=600):
        if not received:
            first = time.perf_counter() - start
        received += 1
    return first, received


async def conversation(target: str, pid: int, fixed: str, calls: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 26)]) as channel:
        stub = pb_grpc.CharRNNStub(channel)
        before = cpu_seconds(pid)
        ttfc = 0.0
        for k in range(1, calls + 1):
            ttfc, _ = await first_char(stub, fixed[:len(fixed) * k // calls])
        after = cpu_seconds(pid)
    cpu = float("nan")
    if before is not None and after is not None:  # a process started meanwhile counts from zero
        cpu = sum(after[p][0] - before.get(p, (0.0, False))[0] for p in after)
    return {"ttfc_ms": ttfc * 1e3, "cpu_s": cpu}


async def shared_prefix(target: str, prefix: str, tails: list[str]) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)
        await first_char(stub, prefix)  # seen once before
        firsts = await asyncio.gather(*(first_char(stub, prefix + tail) for tail in tails))
    return {"ttfc_ms": statistics.median(t for t, _ in firsts) * 1e3}


async def no_hits(target: str, prompts: list[str], chars: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()
        got = await asyncio.gather(*(first_char(stub, p, chars) for p in prompts))
        elapsed = time.perf_counter() - start
    return {"chars_per_s": sum(n for _, n in got) / elapsed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256 vocab 65)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--total-chars", type=int, default=100_000, help="(a): the last call's prompt")
    p.add_argument("--calls", type=int, default=50, help="(a): calls in the conversation")
    p.add_argument("--streams", type=int, default=64, help="(b) and (c): concurrent streams")
    p.add_argument("--prefix", type=int, default=2000, help="(b): the shared prefix's characters")
    p.add_argument("--short", type=int, default=200, help="(c): each prompt's characters")
    p.add_argument("--chars", type=int, default=300, help="(c): characters generated per stream")
    p.add_argument("--cache-mb", type=int, default=64, help="the cached server's --prompt-cache-mb")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="charrnn-bench-cache-") as tmp:
        model = args.model or build_model(Path(tmp), hidden=args.hidden)[0]
        common = [sys.executable, "-m", "serve", "--model", str(model), "--device", "cpu", "--log-level", "WARNING",
                  "--max-prompt-chars", str(max(args.total_chars, args.prefix + 20, args.short)),
                  "--max-message-bytes", str(max(1 << 20, 8 * args.total_chars)), "--reload-interval", "0"]
        servers = {name: ServerProcess(name, [*common, "--prompt-cache-mb", str(mb)])
                   for name, mb in zip(SERVERS, (0, args.cache_mb), strict=True)}
        results: dict[tuple[str, str], list[float]] = {}
        try:
            for r in range(args.rounds):
                order = SERVERS if r % 2 == 0 else SERVERS[::-1]
                rng = np.random.default_rng(r)
                fixed, prefix = text(rng, args.total_chars), text(rng, args.prefix)
                tails = [text(rng, 20) for _ in range(args.streams)]
                shorts = [text(rng, args.short) for _ in range(args.streams)]
                for name in order:  # the same texts for both: each server sees them new
                    server = servers[name]
                    measured = {
                        **{f"a_{k}": v for k, v in asyncio.run(conversation(server.target, server.pid, fixed,
                                                                            args.calls)).items()},
                        **{f"b_{k}": v for k, v in asyncio.run(shared_prefix(server.target, prefix, tails)).items()},
                        **{f"c_{k}": v for k, v in asyncio.run(no_hits(server.target, shorts, args.chars)).items()}}
                    for key, value in measured.items():
                        results.setdefault((name, key), []).append(value)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()

    def med(name: str, key: str) -> float:
        return statistics.median(results[(name, key)])

    def ratios(key: str, gain: Callable[[float, float], float]) -> str:
        pairs = list(zip(results[("cache off", key)], results[("cache on", key)], strict=True))
        if any(0.0 in pair for pair in pairs):
            # CPU seconds come from /proc in clock ticks (10 ms): a short run can read 0 on one side
            return "     n/a  (a round measured 0: below the clock tick; run more calls)"
        each = [gain(off, on) for off, on in pairs]
        return f"{statistics.median(each):8.2f}x  (rounds {min(each):.2f}..{max(each):.2f})"

    def faster(off: float, on: float) -> float:
        return off / on

    def kept(off: float, on: float) -> float:
        return on / off

    hidden = args.hidden if args.model is None else "?"
    print(f"prompt cache: GRU 2x{hidden}, {args.rounds} rounds interleaved, medians; cache on = "
          f"--prompt-cache-mb {args.cache_mb}")
    print(f"{'':58} {'cache off':>12} {'cache on':>12}   on vs off")
    rows = [
        (f"(a) conversation of {args.calls} calls to {args.total_chars} chars: last call TTFC", "a_ttfc_ms", "ms",
         faster, ">= 10x"),
        (f"(a) conversation: server CPU over the {args.calls} calls", "a_cpu_s", "s", faster, ">= 10x"),
        (f"(b) {args.streams} streams, {args.prefix}-char prefix seen once: TTFC p50", "b_ttfc_ms", "ms", faster,
         ">= 10x"),
        (f"(c) nothing hits, {args.streams} streams x {args.chars} chars: chars/s", "c_chars_per_s", "/s", kept,
         ">= 0.95x"),
    ]
    for label, key, unit, gain, goal in rows:
        digits = 2 if unit == "s" else 1
        off, on = (f"{med(name, key):.{digits}f}{unit}" for name in SERVERS)
        print(f"{label:58} {off:>12} {on:>12} "
              f"{ratios(key, gain)}  goal {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
