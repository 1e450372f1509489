"""The two APIs' cost per character, side by side in one run: charrnn's Generate (the server samples and
streams the characters) against the Triton way (tritonclient, N sequences, one ModelInfer per character,
the client picking each next character), on one server.

    .venv/bin/python bench/kserve.py                          # GRU 2x256, vocab 65 (random weights)
    .venv/bin/python bench/kserve.py --model runs/demo/model.onnx --streams 64 --chars 300

Loads, each from a process of its own: "generate" (bench/load.py), "modelinfer" (bench/kserve_load.py
--mode unary: a ModelInfer call per character) and "stream" (--mode stream: a sequence's requests over
one ModelStreamInfer). Every round runs each load in turn against the same server, so that what a
shared machine does to its speed minute by minute lands on all of them alike; ratios are taken within
a round, the median over rounds is printed with its range. CPU us/char: the server's processes (engine
included) and the load's own, which is where the time goes.

tritonclient needs protobuf<7, so the tritonclient loads run under .venv-triton's Python (--triton-python).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, ServerProcess, build_model, cpu_seconds, load_columns  # harness puts the repository root on sys.path

LOADS = ("generate", "modelinfer", "stream")


def _command(load: str, triton_python: str, target: str, streams: int, chars: int) -> list[str]:
    sizes = ["--target", target, "--streams", str(streams), "--chars", str(chars)]
    if load == "generate":
        # no prompt, as the tritonclient loads start every sequence from id 0: the same work before the first
        return [sys.executable, str(ROOT / "bench" / "load.py"), *sizes, "--prompt", ""]
    mode = "unary" if load == "modelinfer" else "stream"
    return [triton_python, str(ROOT / "bench" / "kserve_load.py"), *sizes, "--mode", mode]


def measure(server: ServerProcess, command: list[str]) -> dict:
    before = cpu_seconds(server.pid)
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    after = cpu_seconds(server.pid)
    if out.returncode != 0:
        raise RuntimeError(f"{command[1]} failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    received = max(result["chars"], 1)
    result["server_us"] = None
    if before is not None and after is not None:
        result["server_us"] = sum(after[p][0] - before.get(p, (0.0, False))[0] for p in after) / received * 1e6
    result["client_us"] = result["client_cpu_s"] / received * 1e6
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256 vocab 65)")
    p.add_argument("--streams", type=int, default=64, help="concurrent streams / sequences")
    p.add_argument("--chars", type=int, default=300, help="characters per stream / sequence")
    p.add_argument("--rounds", type=int, default=5, help="times every load runs")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads in the server")
    p.add_argument("--triton-python", default=str(ROOT / ".venv-triton" / "bin" / "python"),
                   help="a Python with tritonclient[grpc] (`make install` makes .venv-triton)")
    args = p.parse_args()
    if not os.access(args.triton_python, os.X_OK):
        print(f"bench/kserve.py: {args.triton_python} is missing: `make install` creates it", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model, _ = build_model(Path(tmp))
        server = ServerProcess("batched", [sys.executable, "-m", "serve", "--model", str(args.model), "--threads",
                                           str(args.threads), "--log-level", "WARNING"])
        sizes = [(args.streams, args.chars), (1, args.chars)]
        print(f"cpus {os.cpu_count()}; model {args.model}; {args.streams} and 1 streams x {args.chars} chars; "
              f"{args.rounds} rounds", flush=True)
        results: dict[tuple[str, int], list[dict]] = {(load, n): [] for load in LOADS for n, _ in sizes}
        try:
            for load in LOADS:  # warm-up: connections, onnxruntime arenas, code paths
                measure(server, _command(load, args.triton_python, server.target, 4, 20))
            for _ in range(args.rounds):
                for load in LOADS:
                    for streams, chars in sizes:
                        results[(load, streams)].append(
                            measure(server, _command(load, args.triton_python, server.target, streams, chars)))
        finally:
            server.stop()

    def median(load: str, streams: int, key: str) -> float:
        values = [r[key] for r in results[(load, streams)] if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    print(f"\n{'':>11} {'':>10} {'chars/s':>9} {'first p50':>9} {'gap p50':>8} {'gap p99':>8}  "
          f"{'CPU us/char: server':>19} {'client':>7}  errors   (medians over rounds)")
    for load in LOADS:
        for streams, _ in sizes:
            errors = sum(r["error_count"] for r in results[(load, streams)])
            print(f"{load:>11} {streams:>3} stream{'s' if streams > 1 else ' '} "
                  + load_columns(lambda key: median(load, streams, key))  # noqa: B023 - called at once
                  + f"{median(load, streams, 'server_us'):>19.1f} {median(load, streams, 'client_us'):>7.1f}  {errors}")

    def ratio(a: str, b: str, streams: int, key: str) -> str:
        per_round = sorted(x[key] / y[key] for x, y in zip(results[(a, streams)], results[(b, streams)])
                           if x[key] is not None and y[key])
        if not per_round:
            return "n/a"
        return f"{statistics.median(per_round):.2f}  (rounds {per_round[0]:.2f} to {per_round[-1]:.2f})"

    print("\nratios within each round (median and range over rounds):")
    for streams, _ in sizes:
        for load in LOADS[1:]:
            print(f"  {load} / generate, {streams:>3} stream{'s' if streams > 1 else ' '}: chars/s "
                  f"{ratio(load, 'generate', streams, 'chars_per_s')}; server CPU per char "
                  f"{ratio(load, 'generate', streams, 'server_us')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
