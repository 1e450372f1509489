"""Soak: many concurrent mixed calls (Generate, Predict, Step) against a server subprocess for a while.

    .venv/bin/python bench/soak.py                              # 256 callers, 60 s, GRU 2x256 (random weights)
    .venv/bin/python bench/soak.py --model runs/demo/model.onnx --callers 32 --seconds 5
    .venv/bin/python bench/soak.py --model runs/demo/model.onnx --leak-calls 1000   # bytes per rpc

Starts `python -m serve` on 127.0.0.1 port 0, warms it up, then keeps --callers calls in flight for
--seconds (each caller starts its next call when the last ends). Prints errors (goal 0), characters
served, and the server's RSS (its engine process included) after warm-up and at the end (goal: growth
< 10%); the last line is JSON. Exit status 1 when there were errors or RSS grew by 10% or more.

--leak-calls N measures a leak per rpc instead, which a percentage over seconds cannot see. After the
warm-up come rounds of N short calls until two rounds in a row grew every process (the server, its
engine process) by at most half of --max-bytes-per-rpc per rpc (at most --settle-rounds: allocator
pools, dict tables and onnxruntime's arena fill in the first few thousand calls, then stop); then 2N
more short calls, measured. Anonymous RSS (RssAnon: the heap, not the pages of shared libraries, which
the kernel drops and reads back when memory runs short) grown over them / their rpcs (a Step call is a
chain of 1 to 4) is each process's bytes per rpc; exit status 1 when one exceeds the limit. A real
leak grows in every round, so settling cannot hide it: 1 KiB per rpc over 2N = 2000 calls (about 3000
rpcs) is 3 MiB, where a settled server's readings differ by a few hundred KiB.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from harness import ServerProcess, build_model, process_tree  # harness puts the repository root on sys.path
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb  # noqa: E402
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc  # noqa: E402

def rss_of(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def rss_by_process(pid: int, field: str = "VmRSS") -> dict[str, int]:
    """Resident memory of the server ("server") and each process below it (its engine: "engine").
    field "RssAnon" leaves out pages of files (shared libraries), which the kernel drops and reads
    back as memory runs short: jitter, not growth."""
    tree = process_tree(pid)
    names = ["server"] + [f"engine{'' if len(tree) == 2 else f' {p}'}" for p in tree[1:]]
    return {name: rss_of(p, field) for name, p in zip(names, tree)}


def rss_bytes(pid: int) -> int:
    """Resident memory of the server process and its engine process together."""
    return sum(rss_by_process(pid).values())


class Caller:
    """One caller: random calls back to back, counting characters served and errors by status."""

    def __init__(self, stub: pb_grpc.CharRNNStub, vocab: list[str], seed: int, stats: dict) -> None:
        self.stub, self.vocab, self.rng, self.stats = stub, vocab, random.Random(seed), stats

    def text(self, low: int, high: int) -> str:
        return "".join(self.rng.choices(self.vocab, k=self.rng.randint(low, high)))

    async def one(self, scale: float) -> None:
        """One random call; scale < 1 shortens it (the leak check wants many calls, not long ones)."""
        kind = self.rng.choice(("Generate", "Predict", "Step"))
        if kind == "Generate":
            request = pb.GenerateRequest(prompt=self.text(0, 20), max_chars=self.rng.randint(1, round(400 * scale)),
                                         temperature=0.8, seed=self.rng.getrandbits(32))
            self.stats["rpcs"] += 1
            async for _ in self.stub.Generate(request, timeout=60):
                self.stats["chars"] += 1
        elif kind == "Predict":
            chunks = [pb.PredictRequest(text=self.text(1, 30), top_k=3) for _ in range(self.rng.randint(1, 4))]
            self.stats["rpcs"] += 1
            async for _ in self.stub.Predict(iter(chunks), timeout=60):
                self.stats["chars"] += 1
        else:
            state = b""
            for _ in range(self.rng.randint(1, 4)):  # a chain: all but the first decode a state
                self.stats["rpcs"] += 1
                reply = await self.stub.Step(pb.StepRequest(state=state, text=self.text(1, 10)), timeout=60)
                state = reply.state
                self.stats["chars"] += 1
        self.stats["calls"][kind] += 1

    async def run(self, more: Callable[[], bool], scale: float) -> None:
        while more():
            try:
                await self.one(scale)
            except grpc.aio.AioRpcError as error:
                self.stats["errors"][f"{error.code().name}: {error.details()}"] += 1


async def drive(target: str, callers: int, seed: int, seconds: float | None = None,
                calls: int | None = None) -> dict:
    """--callers calls in flight for `seconds`, or until `calls` short ones have started."""
    stats: dict = {"chars": 0, "rpcs": 0, "calls": collections.Counter(), "errors": collections.Counter()}
    if calls is None:
        assert seconds is not None
        until = time.monotonic() + seconds

        def more() -> bool:
            return time.monotonic() < until
    else:
        left = [calls]

        def more() -> bool:
            left[0] -= 1
            return left[0] >= 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)
        vocab = list((await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)).vocab)
        scale = 1.0 if calls is None else 0.05
        await asyncio.gather(*(Caller(stub, vocab, seed + i, stats).run(more, scale) for i in range(callers)))
    return stats


def report_errors(stats: dict) -> int:
    errors = sum(stats["errors"].values())
    print(f"  calls:  {sum(stats['calls'].values())} ({', '.join(f'{k} {v}' for k, v in sorted(stats['calls'].items()))})")
    print(f"  errors: {errors}" + "".join(f"\n    {n} x {e}" for e, n in stats["errors"].most_common(5)))
    return errors


def soak(server: ServerProcess, args: argparse.Namespace) -> int:
    rss_ready = rss_bytes(server.pid)
    asyncio.run(drive(server.target, args.callers, args.seed + 10**6, seconds=args.warmup))
    rss_start = rss_bytes(server.pid)
    start = time.perf_counter()
    stats = asyncio.run(drive(server.target, args.callers, args.seed, seconds=args.seconds))
    elapsed = time.perf_counter() - start
    rss_end = rss_bytes(server.pid)
    growth = rss_end / rss_start - 1
    mib = 1 << 20
    print(f"soak: {args.callers} callers x {elapsed:.1f} s against {server.target} ({args.model_name})")
    errors = report_errors(stats)
    print(f"  chars served: {stats['chars']} ({stats['chars'] / elapsed:.0f}/s)")
    print(f"  server RSS: {rss_ready / mib:.1f} MiB ready, {rss_start / mib:.1f} MiB after warm-up, "
          f"{rss_end / mib:.1f} MiB at the end: growth {growth * 100:+.1f}% (goal < 10%)")
    print(json.dumps({"callers": args.callers, "seconds": round(elapsed, 1), "errors": errors,
                      "calls": dict(stats["calls"]), "chars": stats["chars"], "rss_ready": rss_ready,
                      "rss_start": rss_start, "rss_end": rss_end, "rss_growth": round(growth, 4)}))
    return 0 if errors == 0 and growth < 0.10 else 1


def leak_check(server: ServerProcess, args: argparse.Namespace) -> int:
    n, limit = args.leak_calls, args.max_bytes_per_rpc

    def calls(count: int, seed: int) -> tuple[dict, dict[str, float]]:
        """count short calls: (their stats, each process's RSS growth per rpc meanwhile; a Step call is
        a chain of 1 to 4 rpcs)."""
        before = rss_by_process(server.pid, "RssAnon")
        stats = asyncio.run(drive(server.target, args.callers, seed, calls=count))
        after = rss_by_process(server.pid, "RssAnon")
        return stats, {name: (after[name] - before[name]) / stats["rpcs"] for name in before}

    asyncio.run(drive(server.target, args.callers, args.seed + 10**6, seconds=args.warmup))
    errors, settling, quiet = 0, [], 0
    for round_ in range(args.settle_rounds):
        stats, growth = calls(n, args.seed + (round_ + 2) * 10**6)
        errors += sum(stats["errors"].values())
        settling.append({k: round(v) for k, v in growth.items()})
        quiet = quiet + 1 if max(growth.values()) <= limit / 2 else 0
        if quiet == 2:  # one quiet round can be luck between two of the first allocations' steps
            break
    start = time.perf_counter()
    stats, per_call = calls(2 * n, args.seed)
    elapsed = time.perf_counter() - start
    print(f"leak check: {len(settling)} rounds of {n} calls to settle (bytes per rpc: {settling}), then "
          f"{2 * n} calls ({stats['rpcs']} rpcs) measured ({args.callers} in flight, {elapsed:.1f} s) against "
          f"{server.target} ({args.model_name})")
    errors += report_errors(stats)
    for name, grew in per_call.items():
        print(f"  {name} anonymous RSS: {grew:+.0f} bytes per rpc (limit {limit:g})")
    print(json.dumps({"callers": args.callers, "calls": 2 * n, "rpcs": stats["rpcs"], "seconds": round(elapsed, 1),
                      "errors": errors, "by_kind": dict(stats["calls"]), "settling": settling,
                      "bytes_per_rpc": {k: round(v, 1) for k, v in per_call.items()}}))
    return 0 if errors == 0 and max(per_call.values()) <= limit else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256, vocab 65)")
    p.add_argument("--callers", type=int, default=256, help="calls kept in flight at once")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to keep them in flight")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the first RSS reading")
    p.add_argument("--leak-calls", type=int, metavar="N",
                   help="measure bytes per rpc instead: rounds of N short calls to settle, then 2N measured")
    p.add_argument("--max-bytes-per-rpc", type=float, default=256.0,
                   help="with --leak-calls: the most anonymous RSS growth per rpc allowed for any process")
    p.add_argument("--settle-rounds", type=int, default=6, help="with --leak-calls: at most this many rounds")
    p.add_argument("--engine", choices=("process", "thread"), default="process", help="the server's --engine")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp))[0]
        args.model_name = model.name
        try:
            server = ServerProcess("soak server", [
                sys.executable, "-m", "serve", "--model", str(model), "--port", "0", "--log-level", "WARNING",
                "--max-streams", str(max(1024, 2 * args.callers)), "--max-chars", "1000", "--engine", args.engine])
        except RuntimeError as error:
            print(f"the server did not start: {error}", file=sys.stderr)
            return 1
        try:
            return leak_check(server, args) if args.leak_calls else soak(server, args)
        finally:
            server.stop(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
