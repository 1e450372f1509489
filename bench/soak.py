"""Soak: many concurrent mixed calls (Generate, Predict, Step) against a server subprocess for a while.

    .venv/bin/python bench/soak.py                              # 256 callers, 60 s, GRU 2x256 (random weights)
    .venv/bin/python bench/soak.py --model runs/demo/model.onnx --callers 32 --seconds 5

Starts `python -m serve` on 127.0.0.1 port 0, warms it up, then keeps --callers calls in flight for
--seconds (each caller starts its next call when the last ends). Prints errors (goal 0), characters
served, and the server's RSS (its engine process included) after warm-up and at the end (goal: growth < 10%); the last line is JSON.
Exit status 1 when there were errors or RSS grew by 10% or more.
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
from pathlib import Path

import grpc

from harness import ServerProcess, build_model, process_tree  # harness puts the repository root on sys.path
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb  # noqa: E402
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc  # noqa: E402

def rss_bytes(pid: int) -> int:
    """Resident memory of the server process and its engine process together."""
    total = 0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
        else:
            raise RuntimeError(f"no VmRSS for process {p}")
    return total


class Caller:
    """One caller: random calls back to back, counting characters served and errors by status."""

    def __init__(self, stub: pb_grpc.CharRNNStub, vocab: list[str], seed: int, stats: dict) -> None:
        self.stub, self.vocab, self.rng, self.stats = stub, vocab, random.Random(seed), stats

    def text(self, low: int, high: int) -> str:
        return "".join(self.rng.choices(self.vocab, k=self.rng.randint(low, high)))

    async def one(self) -> None:
        kind = self.rng.choice(("Generate", "Predict", "Step"))
        if kind == "Generate":
            request = pb.GenerateRequest(prompt=self.text(0, 20), max_chars=self.rng.randint(1, 400),
                                         temperature=0.8, seed=self.rng.getrandbits(32))
            async for _ in self.stub.Generate(request, timeout=60):
                self.stats["chars"] += 1
        elif kind == "Predict":
            chunks = [pb.PredictRequest(text=self.text(1, 30), top_k=3) for _ in range(self.rng.randint(1, 4))]
            async for _ in self.stub.Predict(iter(chunks), timeout=60):
                self.stats["chars"] += 1
        else:
            state = b""
            for _ in range(self.rng.randint(1, 4)):
                reply = await self.stub.Step(pb.StepRequest(state=state, text=self.text(1, 10)), timeout=60)
                state = reply.state
                self.stats["chars"] += 1
        self.stats["calls"][kind] += 1

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            try:
                await self.one()
            except grpc.aio.AioRpcError as error:
                self.stats["errors"][f"{error.code().name}: {error.details()}"] += 1


async def drive(target: str, callers: int, seconds: float, seed: int) -> dict:
    stats: dict = {"chars": 0, "calls": collections.Counter(), "errors": collections.Counter()}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CharRNNStub(channel)
        vocab = list((await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)).vocab)
        until = time.monotonic() + seconds
        await asyncio.gather(*(Caller(stub, vocab, seed + i, stats).run(until) for i in range(callers)))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256, vocab 65)")
    p.add_argument("--callers", type=int, default=256, help="calls kept in flight at once")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to keep them in flight")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the first RSS reading")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp))[0]
        try:
            server = ServerProcess("soak server", [
                sys.executable, "-m", "serve", "--model", str(model), "--port", "0", "--log-level", "WARNING",
                "--max-streams", str(max(1024, 2 * args.callers)), "--max-chars", "1000"])
        except RuntimeError as error:
            print(f"the server did not start: {error}", file=sys.stderr)
            return 1
        try:
            target = server.target
            rss_ready = rss_bytes(server.pid)
            asyncio.run(drive(target, args.callers, args.warmup, args.seed + 10**6))
            rss_start = rss_bytes(server.pid)
            start = time.perf_counter()
            stats = asyncio.run(drive(target, args.callers, args.seconds, args.seed))
            elapsed = time.perf_counter() - start
            rss_end = rss_bytes(server.pid)
        finally:
            server.stop(timeout=60)
    errors = sum(stats["errors"].values())
    growth = rss_end / rss_start - 1
    mib = 1 << 20
    print(f"soak: {args.callers} callers x {elapsed:.1f} s against {target} ({model.name})")
    print(f"  calls:  {sum(stats['calls'].values())} ({', '.join(f'{k} {v}' for k, v in sorted(stats['calls'].items()))})")
    print(f"  errors: {errors}" + "".join(f"\n    {n} x {e}" for e, n in stats["errors"].most_common(5)))
    print(f"  chars served: {stats['chars']} ({stats['chars'] / elapsed:.0f}/s)")
    print(f"  server RSS: {rss_ready / mib:.1f} MiB ready, {rss_start / mib:.1f} MiB after warm-up, "
          f"{rss_end / mib:.1f} MiB at the end: growth {growth * 100:+.1f}% (goal < 10%)")
    print(json.dumps({"callers": args.callers, "seconds": round(elapsed, 1), "errors": errors,
                      "calls": dict(stats["calls"]), "chars": stats["chars"], "rss_ready": rss_ready,
                      "rss_start": rss_start, "rss_end": rss_end, "rss_growth": round(growth, 4)}))
    return 0 if errors == 0 and growth < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
