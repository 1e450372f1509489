"""The training loop: stateful truncated BPTT over contiguous streams, periodic full validation,
best-validation checkpoint, metrics appended to DIR/metrics.jsonl as training runs."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from train import checkpoint
from train.data import Corpus, chunks, split, streams
from train.model import CharRNN, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    batch_size: int = 32
    seq_len: int = 128
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine decay with warmup, over max(steps, time) progress
    warmup_steps: int = 50
    grad_clip: float = 1.0
    steps: int | None = None
    epochs: int | None = None
    time_budget: float | None = None
    val_fraction: float = 0.1
    eval_every: int = 200
    val_streams: int = 8
    seed: int = 1337
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        for name in ("batch_size", "seq_len", "eval_every", "val_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError("time_budget must be > 0 seconds")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this torch build sees no CUDA device")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: CharRNN, ids: torch.Tensor, n_streams: int, seq_len: int, device: torch.device) -> float:
    """Mean nats/char over the whole validation text, state carried along each of n_streams streams."""
    n_streams = max(1, min(n_streams, (len(ids) - 1) // 2))
    inputs, targets = streams(ids, n_streams)
    was_training = model.training
    model.eval()
    state = model.init_state(n_streams, device)
    total, count = 0.0, 0
    for x, y in chunks(inputs.to(device), targets.to(device), seq_len):
        logits, state = model(x, state)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


class _Budget:
    """Progress in [0, 1] towards whichever budget ends first; drives both stopping and the schedule."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.total_steps = cfg.steps
        if cfg.epochs is not None:
            by_epochs = cfg.epochs * steps_per_epoch
            self.total_steps = by_epochs if self.total_steps is None else min(self.total_steps, by_epochs)
        self.time_budget = cfg.time_budget
        self.start = time.monotonic()

    def progress(self, step: int) -> float:
        parts = [0.0]
        if self.total_steps:
            parts.append(step / self.total_steps)
        if self.time_budget:
            parts.append((time.monotonic() - self.start) / self.time_budget)
        return min(1.0, max(parts))


def _lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # floor at lr/10


def train(corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    """Train, keep the best-validation checkpoint in cfg.out, and return the training summary."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")

    ids = corpus.encode(corpus.text)
    train_ids, split_val = split(ids, cfg.val_fraction)
    # None: too little text to validate on (the seed lesson), so keep the last weights
    val_ids = split_val if len(split_val) >= 2 else None
    inputs, targets = streams(train_ids, cfg.batch_size)
    steps_per_epoch = math.ceil(inputs.shape[1] / cfg.seq_len)
    budget = _Budget(cfg, steps_per_epoch)

    model = CharRNN(model_cfg).to(device)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    decay = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=decay)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "corpus %s: %d chars (%d train, %d val), vocab %d; %s %dx%d, %d parameters, %s, %d steps/epoch",
        corpus.name, len(ids), len(train_ids), 0 if val_ids is None else len(val_ids), len(corpus.vocab),
        model_cfg.cell, model_cfg.num_layers, model_cfg.hidden_size, n_params, device, steps_per_epoch,
    )

    step, epoch, chars = 0, 0, 0
    best_val, best_step = math.inf, 0
    last_train_loss = math.nan

    def emit(record: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def summary() -> dict[str, Any]:
        return {
            "corpus": corpus.name,
            "corpus_chars": len(ids),
            "steps": step,
            "epochs": epoch,
            "chars_seen": chars,
            "best_val_loss": None if val_ids is None else best_val,
            "best_step": best_step,
            "final_train_loss": last_train_loss,
            "seconds": round(time.monotonic() - budget.start, 3),
            "device": str(device),
            "torch_version": str(torch.__version__),
        }

    def save() -> None:
        checkpoint.save(out / checkpoint.FILENAME, {
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_config": model_cfg.to_dict(),
            "vocab": list(corpus.vocab),
            "summary": summary(),
            "train_config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        })

    def validate() -> None:
        nonlocal best_val, best_step
        assert val_ids is not None  # called only when there is a validation split
        val = evaluate(model, val_ids, cfg.val_streams, max(cfg.seq_len, 256), device)
        improved = val < best_val
        if improved:
            best_val, best_step = val, step
            save()
        emit({"event": "val", "step": step, "val_loss": val, "best_val_loss": best_val,
              "elapsed": round(time.monotonic() - budget.start, 3)})
        log.info("step %d: val %.4f nats/char%s", step, val, " (best, saved)" if improved else "")

    model.train()
    done = False
    while not done:
        state = model.init_state(cfg.batch_size, device)  # reset at every epoch start
        for x, y in chunks(inputs, targets, cfg.seq_len):
            progress = budget.progress(step)
            if progress >= 1.0:
                done = True
                break
            lr = _lr_at(cfg, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(device), y.to(device)
            logits, state = model(x, state.detach())  # truncated BPTT: carry the value, not the graph
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            chars += y.numel()
            last_train_loss = loss.item()
            if step % 10 == 0 or step == 1:
                emit({"event": "train", "step": step, "epoch": epoch, "loss": last_train_loss, "lr": lr,
                      "chars": chars, "elapsed": round(time.monotonic() - budget.start, 3)})
            if step % 100 == 0:
                log.info("step %d epoch %d: train %.4f nats/char, lr %.2e", step, epoch, last_train_loss, lr)
            if val_ids is not None and step % cfg.eval_every == 0:
                validate()
        else:
            epoch += 1
        if budget.total_steps is None and budget.time_budget is None:
            done = True  # no budget given: one epoch (the CLI always sets one)

    if val_ids is None:
        save()
    elif best_step != step:
        validate()  # the final weights get their chance to be the best
    if not (out / checkpoint.FILENAME).exists():
        save()  # validation never improved on infinity (NaN losses): keep something exportable
    result = summary()
    emit({"event": "done", **result})
    return result
