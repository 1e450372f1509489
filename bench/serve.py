"""Serving benchmark: the batched server, the same server unbatched (--max-batch 1), and the model-free
transport ceiling, measured side by side in one run on one machine, plus onnxruntime vs PyTorch step latency.

    .venv/bin/python bench/serve.py                        # GRU 2x256, vocab 65 (random weights), 64 and 1 streams
    .venv/bin/python bench/serve.py --model runs/demo/model.onnx --checkpoint runs/demo --streams 64 --chars 300

Each load runs from a separate process (bench/load.py). Speed does not depend on the weights, so by
default a freshly initialised model of the issue's size is exported to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, ServerProcess, build_model  # harness puts the repository root on sys.path


def load(target: str, streams: int, chars: int, connections: int = 1) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--target", target, "--streams",
                          str(streams), "--chars", str(chars), "--connections", str(connections)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"load against {target} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_latency(model_path: Path, run_dir: Path, batches: tuple[int, ...], repeats: int) -> dict:
    """Median seconds of one seq=1 step, onnxruntime (1 thread) vs PyTorch eager (1 thread), same weights."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from export.to_onnx import rebuild
    from train import checkpoint

    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    model = rebuild(checkpoint.load(run_dir))
    cfg = model.config
    result = {}
    for batch in batches:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 1))
        state = np.zeros((batch, cfg.num_layers, cfg.state_size), dtype=np.float32)
        t_ids, t_state = torch.from_numpy(ids), torch.from_numpy(state)
        ort_times, torch_times = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, {"input_ids": ids, "state_in": state})
            ort_times.append(time.perf_counter() - t)
            with torch.inference_mode():
                t = time.perf_counter()
                model(t_ids, t_state)
                torch_times.append(time.perf_counter() - t)
        result[batch] = (statistics.median(ort_times), statistics.median(torch_times))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256 vocab 65)")
    p.add_argument("--checkpoint", type=Path, help="its run folder, for the PyTorch comparison")
    p.add_argument("--cell", default="gru")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=300)
    p.add_argument("--workers", type=int, default=2,
                   help="also measure N server processes on one port (--workers); 1 = skip")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads in the server")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model, args.checkpoint = build_model(Path(tmp), args.cell, args.layers, args.hidden)
        serve = [sys.executable, "-m", "serve", "--model", str(args.model), "--threads", str(args.threads),
                 "--log-level", "WARNING"]
        # name -> (argv, TCP connections the load uses)
        servers = {
            "ceiling": ([sys.executable, str(ROOT / "bench" / "ceiling.py")], 1),
            "batched": (serve, 1),
            "unbatched": (serve + ["--max-batch", "1"], 1),
        }
        if args.workers > 1:  # SO_REUSEPORT spreads connections, so both sides of this pair use several
            conns = 2 * args.workers
            servers[f"batched, {conns} conns"] = (serve, conns)
            servers[f"x{args.workers} procs, {conns} conns"] = (serve + ["--workers", str(args.workers)], conns)
        loads = [(args.streams, args.chars), (1, args.chars)]
        results: dict[tuple[str, int], dict] = {}
        print(f"cpus {os.cpu_count()}; model {args.model}; {args.streams} and 1 streams x {args.chars} chars")
        for name, (argv, conns) in servers.items():
            server = ServerProcess(name, argv)
            try:
                load(server.target, 4, 20, conns)  # warm-up: connections, onnxruntime arenas, code paths
                for streams, chars in loads:
                    results[(name, streams)] = r = load(server.target, streams, chars, conns)
                    print(f"{name:>20} {streams:>3} streams: {r['chars_per_s']:>9.0f} chars/s  "
                          f"ttfc p50 {r['ttfc_p50_ms']:>7.2f} ms  gap p50 {r['gap_p50_ms']:>6.3f} ms "
                          f"p99 {r['gap_p99_ms']:>7.3f} ms  errors {r['error_count']}", flush=True)
            finally:
                server.stop()

        def ratio(a: tuple[str, int], b: tuple[str, int]) -> float:
            return results[a]["chars_per_s"] / results[b]["chars_per_s"]

        n = args.streams
        print("\nratios (chars/s):")
        print(f"  batched / ceiling,   {n} streams: {ratio(('batched', n), ('ceiling', n)):.2f}  (target >= 0.7)")
        print(f"  batched / unbatched, {n} streams: {ratio(('batched', n), ('unbatched', n)):.2f}  (target >= 2)")
        print(f"  batched / ceiling,    1 stream:  {ratio(('batched', 1), ('ceiling', 1)):.2f}  (target >= 0.5)")
        if args.workers > 1:
            multi, single = list(servers)[-1], list(servers)[-2]
            print(f"  {multi} / {single}, {n} streams: {ratio((multi, n), (single, n)):.2f}")

        print("\nstep latency, seq 1, one thread (median):")
        for batch, (ort_s, torch_s) in step_latency(args.model, args.checkpoint, (1, 64), 300).items():
            print(f"  batch {batch:>3}: onnxruntime {ort_s * 1e6:7.1f} us ({batch / ort_s:8.0f} chars/s), "
                  f"PyTorch eager {torch_s * 1e6:7.1f} us; onnxruntime {torch_s / ort_s:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
