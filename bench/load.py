"""Load generator: N concurrent Generate streams of M characters against one target, from its own process.

    python bench/load.py --target 127.0.0.1:50051 --streams 64 --chars 300

Prints one JSON line: chars/s over the whole run, time to first character and the gaps between
characters (p50/p99, milliseconds), the client's own CPU seconds (all its threads, while streaming),
and errors. Every stream is seeded, so repeated runs do the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb  # noqa: E402
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc  # noqa: E402


async def one_stream(stub, prompt: str, chars: int, seed: int, ttfc: list, gaps: list) -> int:
    request = pb.GenerateRequest(prompt=prompt, max_chars=chars, temperature=0.8, seed=seed)
    start = time.perf_counter()
    last = None
    received = 0
    async for _ in stub.Generate(request):
        now = time.perf_counter()
        if last is None:
            ttfc.append(now - start)
        else:
            gaps.append(now - last)
        last = now
        received += 1
    return received


async def run(target: str, streams: int, chars: int, prompt: str, connections: int = 1) -> dict:
    # A local subchannel pool per channel gives each its own TCP connection (else gRPC shares one),
    # which is what lets SO_REUSEPORT spread the streams over several server processes.
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    try:
        stubs = [pb_grpc.CharRNNStub(c) for c in channels]
        await asyncio.gather(*(c.channel_ready() for c in channels))
        ttfc: list[float] = []
        gaps: list[float] = []
        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(
            *(one_stream(stubs[seed % connections], prompt, chars, seed, ttfc, gaps) for seed in range(streams)),
            return_exceptions=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    received = sum(r for r in results if isinstance(r, int))
    errors = [repr(r) for r in results if not isinstance(r, int)]
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 3) if xs else None  # noqa: E731
    return {"streams": streams, "chars": received, "seconds": round(elapsed, 3),
            "chars_per_s": round(received / elapsed, 1), "ttfc_p50_ms": ms(ttfc, 50), "ttfc_p99_ms": ms(ttfc, 99),
            "gap_p50_ms": ms(gaps, 50), "gap_p99_ms": ms(gaps, 99), "client_cpu_s": round(cpu, 4), "errors": errors[:3],
            "error_count": len(errors)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=300)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--connections", type=int, default=1, help="TCP connections the streams are spread over")
    args = p.parse_args()
    result = asyncio.run(run(args.target, args.streams, args.chars, args.prompt, args.connections))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
