"""A fixed-budget training run that says how fast and how well this machine trains: for the lent GPU machine.

    python -m train.gpu_check --corpus ../shared/data/tinyshakespeare.txt                 # 60 s, bfloat16
    python -m train.gpu_check --corpus ../shared/data/tinyshakespeare.txt --dtype float32 --compile
    python -m train.gpu_check --dry-run                        # the same path on the CPU, tiny, seconds

Trains the recipe below for --seconds of training steps (evaluation not counted) on CUDA with the given
--dtype / --compile / --tf32, then prints the device, the settings, training chars/s and both validation
figures of the best checkpoint; the last line is JSON. --dry-run swaps in the CPU and a tiny model, so the
suite can run every line of it without a GPU. Without CUDA (and without --dry-run) it exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from train.data import load_corpus
from train.loop import RunOptions, TrainConfig, train
from train.model import ModelConfig

# GPU-sized: wide and long
RECIPE: dict[str, Any] = dict(cell="gru", num_layers=2, hidden_size=512, batch_size=128, seq_len=256)
DRY: dict[str, Any] = dict(cell="gru", num_layers=1, hidden_size=16, batch_size=4, seq_len=16)


def check(corpus_spec: str | None, seconds: float, dtype: str, compile: bool, tf32: bool, dry_run: bool,
          out: Path) -> dict:
    """Train for `seconds` and return the figures gpu_check prints."""
    recipe = DRY if dry_run else RECIPE
    corpus = load_corpus(corpus_spec)
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), cell=recipe["cell"], num_layers=recipe["num_layers"],
                            hidden_size=recipe["hidden_size"])
    cfg = TrainConfig(out=out, batch_size=recipe["batch_size"], seq_len=recipe["seq_len"], time_budget=seconds,
                      eval_every=10**9, device="cpu" if dry_run else "cuda", dtype=dtype, compile=compile,
                      tf32=tf32)
    summary = train(corpus, model_cfg, cfg, RunOptions(progress="quiet"))
    device = torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu (dry run)"
    return {"device": device, "dtype": dtype, "compile": compile, "tf32": tf32, "recipe": recipe,
            "steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "chars_per_s": summary["chars_seen"] / summary["train_seconds"],
            "val_loss": summary["best_val_loss"], "val_loss_windowed": summary["best_val_loss_windowed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="as python -m train takes it (default: the embedded corpus)")
    p.add_argument("--seconds", type=float, default=60.0, help="training seconds (default 60)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dry-run", action="store_true", help="CPU and a tiny model: checks the script, not a GPU")
    p.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.dry_run and not torch.cuda.is_available():
        print("train.gpu_check: error: this torch build sees no CUDA device (--dry-run runs the same path on the "
              "CPU)", file=sys.stderr)
        return 2
    if args.dry_run and args.compile:
        print("train.gpu_check: error: --compile is CUDA only, and --dry-run runs on the CPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        fig = check(args.corpus, args.seconds, args.dtype, args.compile, args.tf32, args.dry_run,
                    args.out or Path(tmp) / "run")
    r = fig["recipe"]
    print(f"{fig['device']}: {r['cell']} {r['num_layers']}x{r['hidden_size']}, batch {r['batch_size']}, window "
          f"{r['seq_len']}, {fig['dtype']}{', compiled' if fig['compile'] else ''}{', tf32' if fig['tf32'] else ''}")
    print(f"{fig['steps']} steps in {fig['train_seconds']:.1f}s of training: {fig['chars_per_s']:,.0f} chars/s")
    if fig["val_loss"] is not None:
        print(f"validation: carried {fig['val_loss']:.4f}, windowed {fig['val_loss_windowed']:.4f} nats/char")
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
