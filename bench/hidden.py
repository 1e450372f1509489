"""What the `hidden` graph output costs a generation step (issue 20): the same model with and without it,
side by side in one run.

    .venv/bin/python bench/hidden.py                      # GRU 2x256 vocab 65 (random weights)
    .venv/bin/python bench/hidden.py --model runs/demo/model.onnx --rounds 9

onnxruntime runs the whole graph whatever outputs a call fetches, so a file with `hidden` may cost a
step something even when the server's step (serve/engine/runtime.py: logits and state_out only) never
asks for it. Three sessions on one model, one character per row (a Generate step), batch 1 and 64:
  without   the graph with `hidden` removed (and every node only it needed): the file before issue 20
  with      the file as export writes it, fetching logits and state_out (what Generate does)
  fetched   the same file, fetching hidden too (what a trace's call does)
Every round times each session in turn (the order rotating) for `calls` steps; medians over rounds of
the per-step time. One intra-op thread, as the server's default --threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

# harness puts the repository root on sys.path
from harness import build_model

from export.contract import without_hidden

OUTPUTS = ("logits", "state_out")


def session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def per_step(sess: ort.InferenceSession, outputs: tuple[str, ...], batch: int, calls: int, layers: int,
             state_size: int, vocab: int) -> float:
    rng = np.random.default_rng(batch)
    state = np.zeros((batch, layers, state_size), dtype=np.float32)
    ids = rng.integers(0, vocab, size=(calls, batch, 1)).astype(np.int64)
    start = time.perf_counter()
    for k in range(calls):
        out = sess.run(outputs, {"input_ids": ids[k], "state_in": state})
        state = out[1]
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported model.onnx with `hidden` (default: a fresh GRU 2x256)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=0, help="steps per timing (default: 2000 at batch 1, 200 at 64)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_model(Path(tmp))[0]
        model = onnx.load(str(path))
    if "hidden" not in {o.name for o in model.graph.output}:
        print(f"{path} has no hidden output: export it again", file=sys.stderr)
        return 2
    meta = {p.key: p.value for p in model.metadata_props}
    layers, size, vocab = int(meta["num_layers"]), int(meta["state_size"]), len(json.loads(meta["vocab"]))
    old = without_hidden(model)
    sessions = {"without": (session(old.SerializeToString()), OUTPUTS),
                "with": (session(model.SerializeToString()), OUTPUTS),
                "fetched": (session(model.SerializeToString()), (*OUTPUTS, "hidden"))}
    print(f"{path if args.model else 'fresh model'}: {meta['cell']} {layers}x{meta['hidden_size']}, vocab {vocab}; "
          f"{len(model.graph.node)} nodes with hidden, {len(old.graph.node)} without; onnxruntime {ort.__version__}")
    print(f"{'batch':>5}  {'without':>12}  {'with':>12}  {'fetched':>12}  {'with/without':>12}  "
          f"{'fetched/without':>15}")
    for batch in args.batches:
        calls = args.calls or (2000 if batch == 1 else 200)
        for sess, outputs in sessions.values():  # warm up
            per_step(sess, outputs, batch, 50, layers, size, vocab)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                sess, outputs = sessions[name]
                times[name].append(per_step(sess, outputs, batch, calls, layers, size, vocab))
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{batch:>5}  {med['without'] * 1e6:>10.1f}us  {med['with'] * 1e6:>10.1f}us  "
              f"{med['fetched'] * 1e6:>10.1f}us  {100 * (med['with'] / med['without'] - 1):>+11.1f}%  "
              f"{100 * (med['fetched'] / med['without'] - 1):>+14.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
