"""Serving benchmark: the batched server, the same server unbatched (--max-batch 1), and the model-free
transport ceiling, measured side by side in one run on one machine, plus onnxruntime vs PyTorch step latency.

    .venv/bin/python bench/serve.py                        # GRU 2x256, vocab 65 (random weights), 64 and 1 streams
    .venv/bin/python bench/serve.py --model runs/demo/model.onnx --checkpoint runs/demo --streams 64 --chars 300
    git worktree add /tmp/before 072a717 && .venv/bin/python bench/serve.py --before /tmp/before --only batched,before

All servers start first and stay up; then every round runs each load against each server in turn (each
round starting one server later), so
that what a shared machine does to its speed minute by minute lands on all of them alike. Each ratio is
taken within a round and the median over rounds is printed with its range. Each load runs from a
separate process (bench/load.py). Besides chars/s and latency, each row gives the CPU time per character
of the server (all its processes: --workers, engine processes), of its engine processes alone, and of
the client process, which is where the time goes.

"http (SSE)" is the batched server again, its load streamed completions (`POST /v1/completions`, stream:
true) on its HTTP port instead of gRPC Generate: "http (SSE) / batched" is what the HTTP side costs.

"thread engine" is the server with --engine thread (onnxruntime and sampling in a thread of the server
process, sharing its GIL) for comparison with the default engine process. "model skipped"
(bench/model_skipped.py) is the real server with its model call replaced by a constant: next to the
ceiling and the real server it shows how much of the gap is the model's compute.

"int8" is the batched server on the int8 export of the same checkpoint (python -m export RUN --quantize int8,
docs/int8.md); "int8 / batched" is what int8 weights do to served speed. The step latency section times
the int8 file's step beside the float file's (and the float Scan graph it quantizes, which tells the
graph's form apart from the int8 arithmetic).

"before" (with --before CHECKOUT) is the same batched server run from another checkout of this
repository, e.g. the commit before a change, with this environment's Python: "batched / before" says
what the change did to speed, measured in the same rounds as everything else.

Speed does not depend on the weights, so by default a freshly initialised model of the issue's size is
exported to a temporary folder.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# harness puts the repository root on sys.path
from harness import HTTP, ROOT, ServerProcess, build_int8, build_model, load_columns, measure


def step_latency(model_path: Path, run_dir: Path, batches: tuple[int, ...], repeats: int,
                 others: tuple[Path, ...] = ()) -> dict:
    """Median seconds of one seq=1 step, onnxruntime (1 thread) vs PyTorch eager (1 thread), same weights:
    (onnxruntime, PyTorch, *each of others under onnxruntime), timed in turn within each repeat."""
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
    extra = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in others]
    model = rebuild(checkpoint.load(run_dir))
    cfg = model.config
    result = {}
    for batch in batches:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 1))
        state = np.zeros((batch, cfg.num_layers, cfg.state_size), dtype=np.float32)
        t_ids, t_state = torch.from_numpy(ids), torch.from_numpy(state)
        ort_times, torch_times = [], []
        extra_times: list[list[float]] = [[] for _ in extra]
        for _ in range(repeats):
            for other, times in zip(extra, extra_times, strict=True):
                t = time.perf_counter()
                other.run(None, {"input_ids": ids, "state_in": state})
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            sess.run(None, {"input_ids": ids, "state_in": state})
            ort_times.append(time.perf_counter() - t)
            with torch.inference_mode():
                t = time.perf_counter()
                model(t_ids, t_state)
                torch_times.append(time.perf_counter() - t)
        result[batch] = (statistics.median(ort_times), statistics.median(torch_times),
                         *(statistics.median(times) for times in extra_times))
    return result


def _us(value: float | None) -> str:
    return "    n/a" if value is None else f"{value:7.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx (default: build GRU 2x256 vocab 65)")
    p.add_argument("--checkpoint", type=Path, help="its run folder, for the PyTorch comparison")
    p.add_argument("--cell", default="gru")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=300, help="characters per stream in the many-stream load")
    p.add_argument("--one-stream-chars", type=int, default=1000,
                   help="characters of the one-stream load (300 would take 30 ms: mostly noise)")
    p.add_argument("--rounds", type=int, default=5, help="times every load runs against every server")
    p.add_argument("--workers", type=int, default=2,
                   help="also measure N server processes on one port (--workers); 1 = skip")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads in the server")
    p.add_argument("--event-loop", default="auto", help="the servers' and the ceiling's --event-loop")
    p.add_argument("--before", type=Path, help="another checkout of this repository (e.g. a git worktree of the "
                   "commit before a change): its batched server is measured as 'before'")
    p.add_argument("--only", help="comma-separated server names to measure (e.g. batched,before); default: all")
    args = p.parse_args()
    if args.before is not None and not (args.before / "serve" / "__main__.py").is_file():
        p.error(f"--before {args.before}: not a checkout of this repository (no serve/__main__.py)")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model, args.checkpoint = build_model(Path(tmp), args.cell, args.layers, args.hidden)
        int8, scan = build_int8(args.model, args.checkpoint, Path(tmp))
        common = ["--threads", str(args.threads), "--log-level", "WARNING", "--event-loop", args.event_loop]
        flags = ["--model", str(args.model), *common]
        serve = [sys.executable, "-m", "serve", *flags]
        # name -> (argv, TCP connections the load uses)
        configs = {
            "ceiling": ([sys.executable, str(ROOT / "bench" / "ceiling.py"), "--event-loop", args.event_loop], 1),
            "batched": (serve, 1),
            "http (SSE)": (serve, HTTP),  # the same server, streamed completions on its HTTP port
            "unbatched": (serve + ["--max-batch", "1"], 1),
            "thread engine": (serve + ["--engine", "thread"], 1),
            "model skipped": ([sys.executable, str(ROOT / "bench" / "model_skipped.py"), *flags], 1),
            "int8": ([sys.executable, "-m", "serve", "--model", str(int8), *common], 1),
        }
        if args.before is not None:
            configs["before"] = (serve, 1)
        if args.workers > 1:  # SO_REUSEPORT spreads connections, so both sides of this pair use several
            conns = 2 * args.workers
            configs[f"batched, {conns} conns"] = (serve, conns)
            configs[f"x{args.workers} procs, {conns} conns"] = (serve + ["--workers", str(args.workers)], conns)
        if args.only:
            wanted = [name.strip() for name in args.only.split(",")]
            unknown = [name for name in wanted if name not in configs]
            if unknown:
                p.error(f"--only: unknown server {', '.join(unknown)}; choose from {', '.join(configs)}")
            configs = {name: configs[name] for name in wanted}
        cwd = {"before": args.before} if args.before is not None else {}
        loads = [(args.streams, args.chars), (1, args.one_stream_chars)]
        print(f"cpus {os.cpu_count()}; model {args.model}; {args.streams} streams x {args.chars} chars and "
              f"1 stream x {args.one_stream_chars} chars; {args.rounds} rounds", flush=True)

        servers: dict[str, ServerProcess] = {}
        results: dict[tuple[str, int], list[dict]] = {(name, n): [] for name in configs for n, _ in loads}
        try:
            for name, (argv, conns) in configs.items():
                servers[name] = ServerProcess(name, argv, cwd=cwd.get(name, ROOT), http=conns == HTTP)
                measure(servers[name], 4, 20, conns)  # warm-up: connections, onnxruntime arenas, code paths
            order = list(configs.items())
            for k in range(args.rounds):
                # Each round starts one server later, so that going first (or last) is no server's fixed lot.
                for name, (_, conns) in order[k % len(order):] + order[:k % len(order)]:
                    for streams, chars in loads:
                        results[(name, streams)].append(measure(servers[name], streams, chars, conns))
        finally:
            for server in servers.values():
                server.stop()

        def median(name: str, streams: int, key: str) -> float | None:
            values = [r[key] for r in results[(name, streams)] if r[key] is not None]
            return statistics.median(values) if values else None

        print(f"\n{'':>20} {'':>10} {'chars/s':>9} {'ttfc p50':>9} {'gap p50':>8} {'gap p99':>8}  "
              f"{'CPU us/char: server':>19} {'engine':>7} {'client':>7}  errors   (medians over rounds)")
        for name in configs:
            for streams, _ in loads:
                errors = sum(r["error_count"] for r in results[(name, streams)])
                print(f"{name:>20} {streams:>3} stream{'s' if streams > 1 else ' '} "
                      + load_columns(functools.partial(median, name, streams))
                      + f"{_us(median(name, streams, 'server_us')):>19} {_us(median(name, streams, 'engine_us')):>7} "
                      f"{_us(median(name, streams, 'client_us')):>7}  "
                      f"{errors}")

        def ratio(a: str, b: str, streams: int) -> str:
            per_round = sorted(x["chars_per_s"] / y["chars_per_s"]
                               for x, y in zip(results[(a, streams)], results[(b, streams)], strict=True))
            return f"{statistics.median(per_round):.2f}  (rounds {per_round[0]:.2f} to {per_round[-1]:.2f})"

        n = args.streams
        print("\nratios (chars/s, within each round; median and range over rounds):")
        pairs = [("batched", "ceiling", n, "  target >= 0.7"), ("batched", "unbatched", n, "  target >= 2"),
                 ("http (SSE)", "batched", n, "  target >= 0.7"), ("http (SSE)", "batched", 1, ""),
                 ("batched", "ceiling", 1, "  target >= 0.5"),
                 ("thread engine", "ceiling", n, ""), ("thread engine", "ceiling", 1, ""),
                 ("model skipped", "ceiling", n, ""), ("model skipped", "ceiling", 1, ""),
                 ("int8", "batched", n, ""), ("int8", "batched", 1, ""),
                 ("batched", "before", n, "  target >= 0.95"), ("batched", "before", 1, "  target >= 0.95")]
        if args.workers > 1:
            pairs.append((f"x{args.workers} procs, {2 * args.workers} conns", f"batched, {2 * args.workers} conns",
                          n, ""))
        for a, b, streams, target in pairs:
            if a in configs and b in configs:
                label = f"{a} / {b}, {streams} stream{'s' if streams > 1 else ''}:"
                print(f"  {label:<44} {ratio(a, b, streams)}{target}")

        print("\nstep latency, seq 1, one thread (median):")
        latency = step_latency(args.model, args.checkpoint, (1, n), 300, (int8, scan))
        for batch, (ort_s, torch_s, *_) in latency.items():
            print(f"  batch {batch:>3}: onnxruntime {ort_s * 1e6:7.1f} us ({batch / ort_s:8.0f} chars/s), "
                  f"PyTorch eager {torch_s * 1e6:7.1f} us; onnxruntime {torch_s / ort_s:.1f}x faster")
        print("\nint8 step latency, seq 1, one thread (median, timed in turn with the float file above):")
        for batch, (ort_s, _, int8_s, scan_s) in latency.items():
            goal = "  goal >= 1.5 at batch 64" if batch == 64 else ""
            print(f"  batch {batch:>3}: int8 {int8_s * 1e6:7.1f} us ({batch / int8_s:8.0f} chars/s), "
                  f"{ort_s / int8_s:.2f}x the float file's step{goal}; the float Scan graph it quantizes "
                  f"{scan_s * 1e6:7.1f} us ({ort_s / scan_s:.2f}x)")

        ceiling_cpu = [median("ceiling", s, "server_us") for s in (n, 1)] if "ceiling" in configs else [None]
        if None not in ceiling_cpu:
            # When the client shares the cores, a server cannot beat the ceiling by more than the CPU it adds.
            model_us = latency[n][0] / n * 1e6
            one_gap = 1e6 / median("ceiling", 1, "chars_per_s")
            cost = ceiling_cpu[0] + median("ceiling", n, "client_us")
            print(f"\nper character at {n} streams: the ceiling costs {ceiling_cpu[0]:.1f} us of server CPU and "
                  f"{cost - ceiling_cpu[0]:.1f} us of client CPU;\n  the model step alone adds {model_us:.1f} us, so "
                  f"with every core busy the model alone caps batched / ceiling near {cost / (cost + model_us):.2f}."
                  f"\n  At 1 stream each character waits for the one before it: the model step alone takes "
                  f"{latency[1][0] * 1e6:.0f} us,\n  the ceiling sends a character every {one_gap:.0f} us, so even a "
                  f"server that did nothing but the model step\n  could not pass batched / ceiling = "
                  f"{one_gap / (latency[1][0] * 1e6):.2f} at 1 stream on this machine now.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
