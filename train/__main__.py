"""Train a char-RNN.

    python -m train --corpus hihell --out runs/hihell           # the seed lesson, seconds
    python -m train --time-budget 180 --out runs/demo           # the embedded corpus, 3 minutes
    python -m train --corpus tinyshakespeare --cell lstm --layers 2 --hidden 512 --steps 5000 --out runs/ts

Every option left unset takes the corpus preset's value: the seed lesson's own settings for `hihell`
(one-hot input, one nn.RNN layer of 5, Adam lr 0.1, 100 epochs, seed 777), else those in PRESETS['text'].
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import FILENAME
from train.data import DEFAULT_CACHE, CorpusError, load_corpus
from train.loop import TrainConfig, train
from train.model import CELLS, INPUTS, ModelConfig

PRESETS = {
    "hihell": dict(
        cell="rnn", layers=1, hidden=5, input="onehot", dropout=0.0, optimizer="adam", lr=0.1,
        weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip=0.0, epochs=100, seed=777,
        batch_size=1, seq_len=6, val_fraction=0.0,
    ),
    "text": dict(
        cell="gru", layers=2, hidden=256, input="embedding", dropout=0.0, optimizer="adamw", lr=3e-3,
        weight_decay=0.01, schedule="cosine", warmup_steps=50, grad_clip=1.0, seed=1337,
        batch_size=32, seq_len=128, val_fraction=0.1,
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help=f"run folder: {FILENAME}, metrics.jsonl")
    p.add_argument("--corpus", default=None,
                   help="hihell | default | tinyshakespeare | a UTF-8 file | a folder of .txt files "
                        "(default: the Python language reference shipped with CPython)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where downloads are kept")
    m = p.add_argument_group("model")
    m.add_argument("--cell", choices=sorted(CELLS))
    m.add_argument("--layers", type=int)
    m.add_argument("--hidden", type=int)
    m.add_argument("--input", choices=INPUTS)
    m.add_argument("--embed-size", type=int, default=64)
    m.add_argument("--dropout", type=float)
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, help="number of contiguous streams trained side by side")
    t.add_argument("--seq-len", type=int, help="BPTT window; the state carries across windows")
    t.add_argument("--optimizer", choices=("adam", "adamw"))
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=("cosine", "constant"))
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--grad-clip", type=float, help="max gradient norm; 0 = off")
    t.add_argument("--val-fraction", type=float, help="last fraction of the text held out (contiguous)")
    t.add_argument("--eval-every", type=int, default=200, help="validate every N steps (and at the end)")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="CPU threads for torch (default: half the cores; OpenMP threads that share a core "
                        "with other work spin-wait and ran 30x slower on our 2-core machines)")
    b = p.add_argument_group("budget (the first reached ends training; none given = 1 epoch)")
    b.add_argument("--steps", type=int)
    b.add_argument("--epochs", type=int)
    b.add_argument("--time-budget", type=float, metavar="SECONDS")
    return p


def configs(args: argparse.Namespace, vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
    preset = PRESETS["hihell" if args.corpus == "hihell" else "text"]

    def pick(name: str) -> Any:  # Any: each option has its own type, which the config dataclass states
        return preset.get(name) if getattr(args, name) is None else getattr(args, name)

    model_cfg = ModelConfig(
        vocab_size=vocab_size, cell=pick("cell"), num_layers=pick("layers"), hidden_size=pick("hidden"),
        input=pick("input"), embed_size=args.embed_size, dropout=pick("dropout"),
    )
    epochs = args.epochs
    if epochs is None and args.steps is None and args.time_budget is None:
        epochs = preset.get("epochs", 1)  # no budget given: the preset's, else one pass over the text
    train_cfg = TrainConfig(
        out=args.out, batch_size=pick("batch_size"), seq_len=pick("seq_len"), optimizer=pick("optimizer"),
        lr=pick("lr"), weight_decay=pick("weight_decay"), schedule=pick("schedule"),
        warmup_steps=pick("warmup_steps"), grad_clip=pick("grad_clip"), steps=args.steps,
        epochs=epochs,
        time_budget=args.time_budget, val_fraction=pick("val_fraction"), eval_every=args.eval_every,
        seed=pick("seed"), device=args.device,
    )
    return model_cfg, train_cfg


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(max(1, args.threads))
    try:
        corpus = load_corpus(args.corpus, args.cache_dir)
        model_cfg, train_cfg = configs(args, len(corpus.vocab))
        summary = train(corpus, model_cfg, train_cfg)
    except (CorpusError, ValueError, RuntimeError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    best = summary["best_val_loss"]
    print(
        f"trained {summary['steps']} steps ({summary['chars_seen']} chars) in {summary['seconds']:.1f}s; "
        + (f"best validation {best:.4f} nats/char; " if best is not None else
           f"final train loss {summary['final_train_loss']:.4f} nats/char; ")
        + f"checkpoint {args.out / FILENAME}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
