"""Load generator: N concurrent Generate streams of M characters against one target, from its own process.

    python bench/load.py --target 127.0.0.1:50051 --streams 64 --chars 300
    python bench/load.py --http --target 127.0.0.1:8080 --streams 64 --chars 300   # /v1/completions, SSE

--http streams OpenAI-compatible completions (`stream: true`) over one HTTP/1.1 connection each, read by
a minimal client on asyncio streams (as curl would read them: chunked transfer, one `data:` event per
character), so that the client's own cost stays as small as grpc.aio's on the other side.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import percentile_ms

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc


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


async def one_sse_stream(host: str, port: int, prompt: str, chars: int, seed: int, ttfc: list, gaps: list) -> int:
    body = json.dumps({"model": "charrnn", "prompt": prompt, "max_tokens": chars, "temperature": 0.8, "seed": seed,
                       "stream": True}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):  # headers
            pass
        last, received, done = None, 0, False
        while not done:
            size = int((await reader.readline()).strip() or b"0", 16)  # chunked transfer
            if not size:
                break
            chunk = await reader.readexactly(size + 2)
            now = time.perf_counter()
            events = chunk.count(b"data: {")
            done = b"data: [DONE]" in chunk
            if events:
                if last is None:
                    ttfc.append(now - start)
                    gaps.extend([0.0] * (events - 1))
                else:
                    gaps.extend([now - last] + [0.0] * (events - 1))
                last = now
                received += events
        return received
    finally:
        writer.close()


async def run_http(target: str, streams: int, chars: int, prompt: str) -> dict:
    host, port = target.rsplit(":", 1)
    ttfc: list[float] = []
    gaps: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(one_sse_stream(host, int(port), prompt, chars, seed, ttfc, gaps)
                                     for seed in range(streams)), return_exceptions=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return _result(streams, results, elapsed, cpu, ttfc, gaps)


def _result(streams: int, results: list, elapsed: float, cpu: float, ttfc: list, gaps: list) -> dict:
    received = sum(r for r in results if isinstance(r, int))
    errors = [repr(r) for r in results if not isinstance(r, int)]
    ms = percentile_ms
    return {"streams": streams, "chars": received, "seconds": round(elapsed, 3),
            "chars_per_s": round(received / elapsed, 1), "ttfc_p50_ms": ms(ttfc, 50), "ttfc_p99_ms": ms(ttfc, 99),
            "gap_p50_ms": ms(gaps, 50), "gap_p99_ms": ms(gaps, 99), "client_cpu_s": round(cpu, 4), "errors": errors[:3],
            "error_count": len(errors)}


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
    return _result(streams, results, elapsed, cpu, ttfc, gaps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=300)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--connections", type=int, default=1, help="TCP connections the streams are spread over")
    p.add_argument("--http", action="store_true", help="stream /v1/completions over HTTP (SSE) instead of gRPC "
                   "Generate; --target is then the server's HTTP address (one connection per stream)")
    args = p.parse_args()
    if args.http:
        result = asyncio.run(run_http(args.target, args.streams, args.chars, args.prompt))
    else:
        result = asyncio.run(run(args.target, args.streams, args.chars, args.prompt, args.connections))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
