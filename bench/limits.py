"""How fast the limits act, measured: a refusal over --max-streams, and a cancelled stream's slot freed.

    .venv/bin/python bench/limits.py                              # GRU 2x256 (random weights), 20 rounds
    .venv/bin/python bench/limits.py --model runs/demo/model.onnx --rounds 50

Starts `python -m serve --max-streams 1` on 127.0.0.1 port 0. Each round opens a long Generate stream
and reads 5 characters, times a Step call (refused with RESOURCE_EXHAUSTED: nothing queues), cancels
the stream and times until a Step call is admitted again (retrying every millisecond). Prints the
median and the worst of each; the last line is JSON. The suite asserts only generous bounds on these
(tests/serve/test_limits.py); the milliseconds live here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from harness import ServerProcess, build_model  # harness puts the repository root on sys.path
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb  # noqa: E402
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc  # noqa: E402


def one_round(stub: pb_grpc.CharRNNStub, prompt: str) -> tuple[float, float]:
    """(seconds to a refusal, seconds from cancel to an admitted call)."""
    stream = stub.Generate(pb.GenerateRequest(prompt=prompt, max_chars=100_000, seed=1), timeout=60)
    for _ in range(5):
        next(stream)
    start = time.perf_counter()
    try:
        stub.Step(pb.StepRequest(text=prompt), timeout=10)
        raise RuntimeError("a second call was admitted at --max-streams 1")
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
    refused = time.perf_counter() - start
    stream.cancel()
    start = time.perf_counter()
    while True:
        try:
            stub.Step(pb.StepRequest(text=prompt), timeout=10)
            return refused, time.perf_counter() - start
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            time.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256, vocab 65)")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp))[0]
        server = ServerProcess("limits server", [sys.executable, "-m", "serve", "--model", str(model), "--port", "0",
                                                 "--log-level", "WARNING", "--max-streams", "1",
                                                 "--max-chars", "100000"])
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.CharRNNStub(channel)
                prompt = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).vocab[0]
                rounds = [one_round(stub, prompt) for _ in range(args.rounds)]
        finally:
            server.stop(timeout=60)
    refused, freed = (sorted(r[i] * 1e3 for r in rounds) for i in (0, 1))
    print(f"limits: {args.rounds} rounds against {server.target} ({model.name}), --max-streams 1")
    print(f"  refused over capacity: median {statistics.median(refused):.1f} ms, worst {refused[-1]:.1f} ms")
    print(f"  slot free after cancel: median {statistics.median(freed):.1f} ms, worst {freed[-1]:.1f} ms")
    print(json.dumps({"rounds": args.rounds, "refused_ms": [round(x, 2) for x in refused],
                      "freed_ms": [round(x, 2) for x in freed]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
