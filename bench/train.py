"""Our training loop against a plain PyTorch loop of the same model, batch and window, and the FLOP/s both
reach against a matmul peak measured in the same run.

    .venv/bin/python bench/train.py                                     # GRU 2x256, B 32, T 64, 40 steps
    .venv/bin/python bench/train.py --corpus ../shared/data/tinyshakespeare.txt --cell lstm --rounds 3
    .venv/bin/python bench/train.py --grid 1,2 16,32,64 64,128,256 --steps 20   # chars/s per threads x B x T

"ours" is train.loop.train() as `python -m train` runs it (no validation split, so only training is timed: its
own train_seconds); "plain" is the textbook loop: embedding -> nn.GRU -> Linear, cross-entropy, AdamW,
gradient clipping, the state carried and detached between windows. Both take the same steps from the same
initial weights; rounds alternate the two so that a machine shared with other work slows both alike; the best
round of each, and the ratio within each round, are printed. FLOPs are counted analytically (the recurrent and
input matmuls and the projection, times 3 for forward + backward), the peak is float32 torch.mm at the same
threads. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ahead of bench/, whose train.py is this file

import torch
import torch.nn.functional as F

from train import distributed
from train.__main__ import PRESETS
from train.data import load_corpus, streams
from train.loop import RunOptions, TrainConfig, train
from train.model import CharRNN, ModelConfig

ROOT = Path(__file__).resolve().parent.parent

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def flops_per_char(cfg: ModelConfig) -> float:
    """Training FLOPs per character: 2 per multiply-add, forward x 3 for forward plus backward."""
    size_in = cfg.vocab_size if cfg.input == "onehot" else cfg.embed_size
    forward = 0
    for layer in range(cfg.num_layers):
        width = size_in if layer == 0 else cfg.hidden_size
        forward += 2 * GATES[cfg.cell] * cfg.hidden_size * (width + cfg.hidden_size)
    forward += 2 * cfg.hidden_size * cfg.vocab_size
    return 3.0 * forward


def matmul_peak(n: int, seconds: float = 1.0) -> float:
    """float32 FLOP/s of an n x n torch.mm, the best of repeated timings over about `seconds`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, spent = 0.0, 0.0
    while spent < seconds:
        began = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - began
        spent += took
        best = max(best, 2.0 * n**3 / took)
    return best


def ours(corpus, model_cfg: ModelConfig, batch: int, seq_len: int, steps: int) -> float:
    """chars/s of train.loop.train over `steps` steps, as its own summary counts them."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=Path(out), batch_size=batch, seq_len=seq_len, steps=steps, val_fraction=0.0,
                          eval_every=10**9, seed=1337, device="cpu")
        summary = train(corpus, model_cfg, cfg, RunOptions(save_every=10**9, progress="quiet"))
    return summary["chars_seen"] / summary["train_seconds"]


def plain(corpus, model_cfg: ModelConfig, batch: int, seq_len: int, steps: int) -> float:
    """chars/s of the textbook stateful truncated-BPTT loop over the same text layout."""
    torch.manual_seed(1337)
    model = CharRNN(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    inputs, targets = streams(corpus.encode(corpus.text), batch)
    windows = inputs.shape[1] // seq_len
    state = model.init_state(batch)
    began = time.perf_counter()
    for step in range(steps):
        t = (step % windows) * seq_len
        logits, state = model(inputs[:, t : t + seq_len], state)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, t : t + seq_len].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state = state.detach()
    return steps * batch * seq_len / (time.perf_counter() - began)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def grid(corpus, model_cfg: ModelConfig, threads: list[int], batches: list[int], windows: list[int],
         steps: int, rounds: int) -> int:
    """chars/s of our loop for every threads x batch x window, rounds interleaved, best round of each."""
    combos = [(t, b, w) for t in threads for b in batches for w in windows]
    rates: dict[tuple[int, int, int], list[float]] = {c: [] for c in combos}
    for _ in range(rounds):
        for combo in combos:
            torch.set_num_threads(combo[0])
            ours(corpus, model_cfg, combo[1], combo[2], 2)  # warm this shape
            rates[combo].append(ours(corpus, model_cfg, combo[1], combo[2], steps))
    per_char = flops_per_char(model_cfg)
    print(f"{model_cfg.cell} {model_cfg.num_layers}x{model_cfg.hidden_size}, {steps} steps x {rounds} rounds; "
          f"{per_char / 1e6:.2f} MFLOP per char")
    print(f"{'threads':>7}{'batch':>7}{'window':>8}{'chars/s':>10}{'GFLOP/s':>9}{'steps/s':>9}   rounds")
    for (t, b, w), values in rates.items():
        best = max(values)
        print(f"{t:>7}{b:>7}{w:>8}{best:>10,.0f}{best * per_char / 1e9:>9.2f}{best / (b * w):>9.2f}   "
              + ", ".join(f"{v:,.0f}" for v in values))
    print(json.dumps({"grid": [{"threads": t, "batch": b, "window": w, "chars_per_s": max(v), "rounds": v}
                               for (t, b, w), v in rates.items()]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="as python -m train takes it (default: the embedded corpus)")
    text = PRESETS["text"]  # what `python -m train` trains by default, so the two cannot drift apart
    p.add_argument("--cell", default=text["cell"], choices=sorted(GATES))
    p.add_argument("--layers", type=int, default=text["layers"])
    p.add_argument("--hidden", type=int, default=text["hidden"])
    p.add_argument("--batch-size", type=int, default=text["batch_size"])
    p.add_argument("--seq-len", type=int, default=text["seq_len"])
    p.add_argument("--steps", type=int, default=40, help="timed steps per round and loop")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--matmul", type=int, default=1024, help="the peak's square matrix size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as python -m train)")
    p.add_argument("--grid", nargs=3, metavar=("THREADS", "BATCHES", "WINDOWS"), default=None,
                   help="instead of ours vs plain: our chars/s for every combination of the comma-separated "
                        "lists, e.g. --grid 1,2 16,32,64 64,128,256")
    args = p.parse_args(argv)
    threads = args.threads or distributed.default_threads(distributed.ONE)
    torch.set_num_threads(threads)
    corpus = load_corpus(args.corpus)
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), cell=args.cell, num_layers=args.layers,
                            hidden_size=args.hidden)
    if args.grid:
        return grid(corpus, model_cfg, *(_ints(g) for g in args.grid), args.steps, args.rounds)
    shape = (corpus, model_cfg, args.batch_size, args.seq_len, args.steps)
    ours(*shape[:-1], 2), plain(*shape[:-1], 2)  # warm both: allocator, thread pool, first-call dispatch
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(args.rounds):
        rates["ours"].append(ours(*shape))
        rates["plain"].append(plain(*shape))
    peak = matmul_peak(args.matmul)
    per_char = flops_per_char(model_cfg)
    best = {name: max(values) for name, values in rates.items()}
    print(f"{args.cell} {args.layers}x{args.hidden}, batch {args.batch_size}, window {args.seq_len}, "
          f"{args.steps} steps x {args.rounds} rounds, {threads} thread(s); {per_char / 1e6:.2f} MFLOP per char")
    print(f"{'loop':<8}{'chars/s':>12}{'GFLOP/s':>10}{'of peak':>9}   rounds")
    for name in ("ours", "plain"):
        rate = best[name]
        print(f"{name:<8}{rate:>12,.0f}{rate * per_char / 1e9:>10.2f}{rate * per_char / peak:>9.1%}   "
              + ", ".join(f"{r:,.0f}" for r in rates[name]))
    print(f"{'matmul':<8}{'':>12}{peak / 1e9:>10.2f}{1:>9.0%}   float32 {args.matmul}x{args.matmul} torch.mm")
    ratio = best["ours"] / best["plain"]
    within = [a / b for a, b in zip(rates["ours"], rates["plain"], strict=True)]
    print(f"ours / plain: {ratio:.3f}x (best rounds); within each round: "
          + ", ".join(f"{r:.3f}x" for r in within) + f" (median {statistics.median(within):.3f}x)")
    print(json.dumps({"ours_chars_per_s": best["ours"], "plain_chars_per_s": best["plain"], "ratio": ratio,
                      "ratio_per_round": within,
                      "flops_per_char": per_char, "matmul_flops": peak, "threads": threads,
                      "rounds": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
