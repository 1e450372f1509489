"""Load generator, the Triton way: N concurrent sequences, one character per ModelInfer, with tritonclient.

    .venv-triton/bin/python bench/kserve_load.py --target 127.0.0.1:50051 --streams 64 --chars 300

Each sequence sends its first character with sequence_start, then feeds back the most likely next
character (argmax of logits, the client's own choice: the protocol has no sampling), one request per
character, the server holding the state; the last request carries sequence_end. --mode unary sends
each request as its own ModelInfer (tritonclient.grpc.aio `infer`); --mode stream sends a sequence's
requests over one ModelStreamInfer stream (`stream_infer`), each after the answer to the one before.

Runs in .venv-triton (tritonclient and numpy only, no project code: tritonclient needs protobuf<7).
Prints one JSON line with the same keys as bench/load.py: chars/s, time to the first character, the
gaps between characters (p50/p99, ms), the client's CPU seconds and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np
import tritonclient.grpc.aio as tc
from tritonclient.utils import InferenceServerException


def _request(token: int, sequence_id: int, start: bool, end: bool) -> dict:
    ids = np.array([[token]], dtype=np.int64)
    inputs = [tc.InferInput("input_ids", [1, 1], "INT64")]
    inputs[0].set_data_from_numpy(ids)
    return {"model_name": "charrnn", "inputs": inputs, "sequence_id": sequence_id, "sequence_start": start,
            "sequence_end": end}


def _next(result) -> int:
    return int(result.as_numpy("logits")[0, -1].argmax())


async def unary(client: tc.InferenceServerClient, sequence_id: int, chars: int, ttfc: list, gaps: list) -> int:
    token, start, last = 0, time.perf_counter(), None
    for i in range(chars):
        token = _next(await client.infer(**_request(token, sequence_id, i == 0, i == chars - 1)))
        now = time.perf_counter()
        (ttfc.append(now - start) if last is None else gaps.append(now - last))
        last = now
    return chars


async def streamed(client: tc.InferenceServerClient, sequence_id: int, chars: int, ttfc: list, gaps: list) -> int:
    answers: asyncio.Queue = asyncio.Queue()
    token = 0

    async def requests():
        nonlocal token
        for i in range(chars):
            yield _request(token, sequence_id, i == 0, i == chars - 1)
            token = await answers.get()  # the next request feeds back this one's answer

    start, last, received = time.perf_counter(), None, 0
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise error
        received += 1
        now = time.perf_counter()
        (ttfc.append(now - start) if last is None else gaps.append(now - last))
        last = now
        await answers.put(_next(result))
        if received == chars:
            break
    return received


async def run(target: str, streams: int, chars: int, mode: str) -> dict:
    one = unary if mode == "unary" else streamed
    ttfc: list[float] = []
    gaps: list[float] = []
    async with tc.InferenceServerClient(target) as client:
        await client.is_server_ready()  # the connection is up before the clock starts
        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(one(client, 1 + s, chars, ttfc, gaps) for s in range(streams)),
                                       return_exceptions=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    received = sum(r for r in results if isinstance(r, int))
    errors = [repr(r) for r in results if not isinstance(r, int)]
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 3) if xs else None  # noqa: E731
    return {"streams": streams, "chars": received, "seconds": round(elapsed, 3),
            "chars_per_s": round(received / elapsed, 1), "ttfc_p50_ms": ms(ttfc, 50), "ttfc_p99_ms": ms(ttfc, 99),
            "gap_p50_ms": ms(gaps, 50), "gap_p99_ms": ms(gaps, 99), "client_cpu_s": round(cpu, 4),
            "errors": errors[:3], "error_count": len(errors)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, default=64, help="concurrent sequences")
    p.add_argument("--chars", type=int, default=300, help="characters (ModelInfer requests) per sequence")
    p.add_argument("--mode", choices=("unary", "stream"), default="unary")
    args = p.parse_args()
    try:
        result = asyncio.run(run(args.target, args.streams, args.chars, args.mode))
    except InferenceServerException as error:
        raise SystemExit(f"kserve_load: {error}") from None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
