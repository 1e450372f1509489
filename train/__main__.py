"""Train a char-RNN.

    python -m train --corpus hihell --out runs/hihell           # the seed lesson, seconds
    python -m train --time-budget 180 --out runs/demo           # the embedded corpus, 3 minutes
    python -m train --corpus tinyshakespeare --cell lstm --layers 2 --hidden 512 --steps 5000 --out runs/ts
    torchrun --standalone --nproc-per-node 2 -m train --out runs/ddp   # data-parallel: B streams shared out
    python -m train --weight-drop 0.2 --locked-hidden 0.1 --ema 0.99 --out runs/reg   # docs/training-regularizers.md

Every option left unset takes the corpus preset's value: the seed lesson's own settings for `hihell`
(one-hot input, one nn.RNN layer of 5, Adam lr 0.1, 100 epochs, seed 777), else those in PRESETS['text'].

DIR gets checkpoint.pt (the best-validation weights, which export reads), last.pt (the latest state, for
--resume), metrics.jsonl and loss.png. A folder that already holds a run is refused unless --resume or
--overwrite says what to do with it. SIGINT or SIGTERM: the current step finishes, last.pt is saved and
training exits 130 or 143; a second signal exits at once. --resume continues exactly where last.pt left
off (weights, optimizer, schedule, position in the text, carried state, RNG states): with a --steps or
--epochs budget a resumed CPU run ends with the same weights as one never interrupted. A --time-budget
schedule follows the clock (training seconds, evaluation excluded), so it cannot be resumed exactly.

Exit status: 0 trained (or nothing left to do); 1 a loss became NaN or infinite (the last good
checkpoints are kept); 2 bad arguments, corpus, or run folder; 130 SIGINT; 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from train import distributed, rundir
from train.checkpoint import FILENAME, CheckpointError
from train.data import DEFAULT_CACHE, CorpusError, load_corpus
from train.loop import Diverged, RunOptions, TrainConfig, train
from train.model import CELLS, INPUTS, ModelConfig

PRESETS = {
    "hihell": dict(
        cell="rnn", layers=1, hidden=5, input="onehot", dropout=0.0, optimizer="adam", lr=0.1,
        weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip=0.0, epochs=100, seed=777,
        batch_size=1, seq_len=6, val_fraction=0.0, ema=0.0,
    ),
    "text": dict(
        cell="gru", layers=2, hidden=256, input="embedding", dropout=0.0, optimizer="adamw", lr=3e-3,
        weight_decay=0.01, schedule="cosine", warmup_steps=50, grad_clip=1.0, seed=1337,
        batch_size=32, seq_len=64, val_fraction=0.1,  # T 64 over 128: bench/recipes.sh (docs/performance.md)
        ema=0.99,  # won on both corpora and both seeds, free per step (docs/training-regularizers.md)
    ),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help=f"run folder: {FILENAME}, last.pt, metrics.jsonl, loss.png")
    where.add_argument("--runs", type=Path, metavar="DIR",
                       help="train into DIR/<identity>, a folder named by a hash of the run's identity (corpus "
                            "text, vocabulary, model, every setting but the budget), and point DIR/latest at it: "
                            "with --resume auto an unchanged identity continues or keeps its run, a changed one "
                            "trains a run of its own beside the earlier ones")
    p.add_argument("--run-tag", default="", metavar="TAG",
                   help="with --runs: part of the identity, so a new TAG trains the same settings again from "
                        "scratch in a folder of its own (default: empty)")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None, metavar="auto",
                   help="continue the run in --out from last.pt (only the budget may change); "
                        "'--resume auto' also starts a fresh run when --out holds none")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: removes checkpoint.pt, last.pt, metrics.jsonl, loss.png "
                        "(never model.onnx, which a server may be reading)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (elsewhere), no info logging: "
                        "only warnings, errors and the closing line")
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
    m.add_argument("--dropout", type=float,
                   help="ordinary dropout between stacked layers and before the projection: a new mask for every "
                        "element at every time step (nn.Dropout; what nn.GRU's own inter-layer dropout did). "
                        "It stacks with the --locked-* rates below; use one or the other")
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
    t.add_argument("--eval-every", type=int, default=200,
                   help="validate every N steps (and at step 0 and the end), under both protocols: carried "
                        "state over the whole validation text, and 256-char windows from the zero state")
    t.add_argument("--save-every", type=int, default=200, help="write last.pt every N steps (and at the end)")
    t.add_argument("--log-every", type=int, default=100,
                   help="a progress line every N steps when stderr is not a terminal")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: autocast the training step (CUDA: cell and projection; CPU: the projection "
                        "only); weights, optimizer, carried state and validation stay float32")
    t.add_argument("--compile", action="store_true", help="torch.compile the model for training (CUDA only)")
    t.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, let float32 matmuls use TF32 tensor cores (default on; no effect on the CPU)")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch per process (default: under torchrun the cores // the node's "
                        "processes; alone, half the cores: OpenMP threads that share a core with other "
                        "work spin-wait; on 2 cores, 2 threads ran 1.4x faster than 1 alone, 2.6x slower "
                        "beside one busy process)")
    r = p.add_argument_group(
        "regularizers (training only, all off by default; export writes plain weights and the same graph; "
        "see docs/training-regularizers.md)")
    r.add_argument("--weight-drop", type=float, default=0.0, metavar="P",
                   help="DropConnect on every layer's recurrent matrix weight_hh: one mask per batch, the fused "
                        "kernel runs on the masked weights (AWD-LSTM)")
    r.add_argument("--locked-input", type=float, default=0.0, metavar="P",
                   help="locked (variational) dropout on the embedding: one mask per sequence, the same at every "
                        "time step of the window (Gal and Ghahramani)")
    r.add_argument("--locked-hidden", type=float, default=0.0, metavar="P",
                   help="locked dropout between stacked layers (none with --layers 1); where --dropout draws a "
                        "new mask per time step, this holds one per sequence")
    r.add_argument("--locked-output", type=float, default=0.0, metavar="P",
                   help="locked dropout on the top layer's output, before the projection")
    r.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights: validation judges it, checkpoint.pt "
                        "holds it and export writes it; last.pt keeps both for --resume (default: 0.99, off for "
                        "hihell; --ema 0 turns it off)")
    r.add_argument("--forget-bias", type=float, default=None, metavar="B",
                   help="LSTM only: every layer's forget-gate bias starts at B (1.0 in Jozefowicz et al. 2015)")
    b = p.add_argument_group("budget (the first reached ends training; none given = 1 epoch; "
                             "--resume may raise it)")
    b.add_argument("--steps", type=int)
    b.add_argument("--epochs", type=int)
    b.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="seconds of training steps (evaluation is not counted); follows the clock, so a "
                        "resumed run cannot repeat an uninterrupted one exactly")
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
        seed=pick("seed"), device=args.device, dtype=args.dtype, compile=args.compile, tf32=args.tf32,
        weight_drop=args.weight_drop, locked_input=args.locked_input, locked_hidden=args.locked_hidden,
        locked_output=args.locked_output, ema=pick("ema"), forget_bias=args.forget_bias,
    )
    return model_cfg, train_cfg


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(resume=args.resume, overwrite=args.overwrite, save_every=args.save_every,
                      log_every=args.log_every, progress="quiet" if args.quiet else "auto",
                      unset=frozenset(name for name in rundir.CHANGED_DEFAULTS if getattr(args, name) is None))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    world = distributed.from_env()
    logging.basicConfig(level=logging.WARNING if args.quiet or not world.main else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(max(1, args.threads or distributed.default_threads(world)))
    try:
        corpus = load_corpus(args.corpus, args.cache_dir)
        if args.runs is not None:  # the folder is the identity's: computed before configs reads args.out
            model_cfg, train_cfg = configs(args, len(corpus.vocab))
            name = rundir.identity(rundir.corpus_sha256(corpus.text), corpus.vocab, model_cfg.to_dict(),
                                   rundir.config_dict(train_cfg), args.run_tag)
            args.out = args.runs / name
            if world.main:
                print(f"run {name}: {args.out}", file=sys.stderr, flush=True)
        model_cfg, train_cfg = configs(args, len(corpus.vocab))
        summary = train(corpus, model_cfg, train_cfg, run_options(args), world)
        if args.runs is not None and world.main and summary["exit_code"] == 0:
            rundir.point_latest(args.runs, args.out.name)
    except Diverged as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    except (CorpusError, CheckpointError, ValueError, RuntimeError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    if world.main:
        print(report(summary, args.out / FILENAME))
    return summary["exit_code"]


def report(summary: dict[str, Any], path: Path) -> str:
    """The closing line: what was trained and both validation figures of the kept weights."""
    if summary["nothing_to_do"]:
        head = f"nothing to do: the run already finished at step {summary['steps']}"
    else:
        head = (f"{'stopped' if summary['interrupted'] else 'trained'} at step {summary['steps']} "
                f"({summary['chars_seen']} chars) in {summary['seconds']:.1f}s ({summary['train_seconds']:.1f}s "
                f"training at {summary['chars_per_second']} chars/s, {summary['eval_seconds']:.1f}s evaluation)")
    best = summary["best_val_loss"]
    if best is None:
        quality = f"final train loss {summary['final_train_loss']:.4f} nats/char"
    else:
        quality = (f"best validation (step {summary['best_step']}): carried {best:.4f} nats/char "
                   f"({summary['best_val_bpc']:.3f} bits/char), windowed {summary['best_val_loss_windowed']:.4f} "
                   f"± {summary['best_windowed_se']:.4f} ({summary['best_val_bpc_windowed']:.3f} bits/char)")
    return f"{head}; {quality}; checkpoint {path}"


if __name__ == "__main__":
    sys.exit(main())
