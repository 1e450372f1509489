"""The training loop: stateful truncated BPTT over contiguous streams, validation under two protocols at
step 0, every eval_every steps and at the end, the best-validation checkpoint, last.pt for an exact
--resume, metrics appended to DIR/metrics.jsonl and DIR/loss.png redrawn as training runs."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F

from train import checkpoint, plot, progress, rundir
from train.data import Corpus, split, streams
from train.evaluate import LN2, evaluate
from train.model import CharRNN, ModelConfig
from train.signals import StopRequests

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
    window_se: float = 0.005  # the windowed protocol reads windows until its standard error is this small
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
        if self.window_se <= 0:
            raise ValueError("window_se must be > 0")


@dataclass(frozen=True)
class RunOptions:
    """How this invocation runs, not what it trains: --resume may change these freely."""

    resume: str | None = None  # None: a fresh run (a used folder is refused); "yes": continue last.pt; "auto"
    overwrite: bool = False  # replace the trainer's files in the folder (never model.onnx)
    save_every: int = 200  # last.pt every N steps: a kill loses at most N steps (a save takes milliseconds)
    log_every: int = 100  # plain progress lines every N steps when stderr is not a terminal
    progress: str = "lines"  # auto (bar on a terminal, else lines) | bar | lines | quiet

    def __post_init__(self) -> None:
        if self.resume not in (None, "yes", "auto"):
            raise ValueError(f"resume must be None, 'yes' or 'auto', got {self.resume!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it")
        for name in ("save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


class Diverged(Exception):
    """A loss became NaN or infinite: training stopped, the last good checkpoints are kept."""


@dataclass
class Position:
    """Everything the loop changes as it runs; saved in last.pt, so that --resume continues exactly."""

    step: int = 0
    epoch: int = 0  # epochs completed
    chunk: int = 0  # the next window's index along the streams, within the epoch
    chars: int = 0
    train_seconds: float = 0.0  # what --time-budget counts: training steps only, never evaluation
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0  # of the sessions before this one
    best_val: float = math.inf
    best_step: int = 0
    best: dict | None = None  # the best validation's record (both protocols)
    last_val: dict | None = None
    last_val_step: int = -1
    loss_smooth: float = math.nan
    last_train_loss: float = math.nan


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this torch build sees no CUDA device")
    return torch.device(name)


class _Budget:
    """Progress in [0, 1] towards whichever budget ends first; drives both stopping and the schedule.
    Time counts training steps only, so evaluation never eats into --time-budget."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.total_steps = cfg.steps
        if cfg.epochs is not None:
            by_epochs = cfg.epochs * steps_per_epoch
            self.total_steps = by_epochs if self.total_steps is None else min(self.total_steps, by_epochs)
        self.time_budget = cfg.time_budget
        if self.total_steps is None and self.time_budget is None:
            self.total_steps = steps_per_epoch  # no budget given: one epoch (the CLI always sets one)

    def progress(self, pos: Position) -> float:
        parts = [0.0]
        if self.total_steps:
            parts.append(pos.step / self.total_steps)
        if self.time_budget:
            parts.append(pos.train_seconds / self.time_budget)
        return min(1.0, max(parts))

    def done(self, pos: Position) -> bool:
        return self.progress(pos) >= 1.0


def _lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # floor at lr/10



def _open_folder(out: Path, run: RunOptions, sha256: str, corpus: Corpus, model_cfg: ModelConfig,
                 cfg: TrainConfig) -> dict | None:
    """Apply --overwrite / --resume to the run folder; the last.pt to continue from, or None to start."""
    files = rundir.held(out)
    if run.overwrite:
        removed = rundir.clear(out)
        if removed:
            log.warning("--overwrite: removed %s from %s (model.onnx, if any, is left for whoever serves it)",
                        ", ".join(removed), out)
        return None
    if run.resume:
        if (out / checkpoint.LAST).exists():
            saved = checkpoint.load(out, checkpoint.LAST)
            problems = rundir.mismatches(saved, sha256, corpus.vocab, model_cfg.to_dict(), rundir.config_dict(cfg))
            if problems:
                raise rundir.RunDirError(
                    f"{out / checkpoint.LAST} is another run: " + "; ".join(problems) + ". --resume may change "
                    "only the budget (--steps, --epochs, --time-budget); --overwrite starts afresh")
            return saved
        if files:
            raise rundir.RunDirError(f"{out} holds {', '.join(files)} but no {checkpoint.LAST} to resume from; "
                                     "--overwrite replaces that run")
        if run.resume == "auto":
            return None
        raise rundir.RunDirError(f"{out}: no run to resume (no {checkpoint.LAST}); --resume auto starts one")
    if files:
        raise rundir.refuse_used(out, files)
    return None


class _Run:
    """One training session over a run folder: the model, its optimizer and where the loop stands."""

    def __init__(self, corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions) -> None:
        self.corpus, self.model_cfg, self.cfg, self.run = corpus, model_cfg, cfg, run
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.sha256 = rundir.corpus_sha256(corpus.text)
        self.ids = corpus.encode(corpus.text)
        train_ids, val_ids = split(self.ids, cfg.val_fraction)
        self.train_chars = len(train_ids)
        self.val_ids = val_ids if len(val_ids) >= 2 else None  # the seed lesson has none: keep the last weights
        self.inputs, self.targets = streams(train_ids, cfg.batch_size)  # may refuse the text: before any file
        self.saved = _open_folder(self.out, run, self.sha256, corpus, model_cfg, cfg)
        self.metrics = self.out / rundir.METRICS

        torch.manual_seed(cfg.seed)
        self.windows = math.ceil(self.inputs.shape[1] / cfg.seq_len)  # per epoch
        self.budget = _Budget(cfg, self.windows)
        self.model = CharRNN(self.model_cfg).to(self.device)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        decay = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
        self.optimizer = opt_cls(self.model.parameters(), lr=cfg.lr, weight_decay=decay)
        self.pos = Position()
        self.state = self.model.init_state(cfg.batch_size, self.device)
        self.started = time.monotonic()
        self.interrupted: str | None = None

    # --- files -------------------------------------------------------------------------------------
    def emit(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _payload(self) -> dict:
        return {
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_config": self.model_cfg.to_dict(),
            "vocab": list(self.corpus.vocab),
            "summary": self.summary(),
            "train_config": rundir.config_dict(self.cfg),
        }

    def save_best(self) -> None:
        checkpoint.save(self.out / checkpoint.FILENAME, self._payload())

    def save_last(self) -> None:
        checkpoint.save(self.out / checkpoint.LAST, {
            **self._payload(),
            "corpus_sha256": self.sha256,
            "resume": {"position": {**asdict(self.pos), "wall_seconds": self.summary()["seconds"]},
                       "state": self.state.detach().cpu(),
                       "optimizer": self.optimizer.state_dict(), "rng": rundir.rng_states()},
        })

    def restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model_state"])
        resume = saved["resume"]
        self.optimizer.load_state_dict(resume["optimizer"])
        self.pos = Position(**resume["position"])
        self.state = resume["state"].to(self.device)
        rundir.restore_rng_states(resume["rng"])
        # A kill after the last save leaves records past it; they are about to be made again.
        kept = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and _record_step(line) <= self.pos.step] if self.metrics.exists() else []
        self.metrics.write_text("".join(line + "\n" for line in kept))

    def draw(self) -> None:
        plot.draw([self.out], self.out / rundir.PLOT)

    def summary(self) -> dict:
        pos, best = self.pos, self.pos.best
        has_val = self.val_ids is not None
        return {
            "corpus": self.corpus.name,
            "corpus_chars": len(self.ids),
            "steps": pos.step,
            "epochs": pos.epoch,
            "chars_seen": pos.chars,
            "best_val_loss": pos.best_val if has_val else None,  # the carried-state protocol, nats/char
            "best_val_bpc": pos.best_val / LN2 if has_val else None,
            "best_val_loss_windowed": best["val_loss_windowed"] if best else None,
            "best_val_bpc_windowed": best["val_bpc_windowed"] if best else None,
            "best_windowed_se": best["windowed_se"] if best else None,
            "best_step": pos.best_step,
            "final_train_loss": pos.last_train_loss,
            "seconds": round(pos.wall_seconds + time.monotonic() - self.started, 3),
            "train_seconds": round(pos.train_seconds, 3),
            "eval_seconds": round(pos.eval_seconds, 3),
            "device": str(self.device),
            "torch_version": str(torch.__version__),
        }

    # --- the loop ----------------------------------------------------------------------------------
    def tick(self) -> progress.Tick:
        pos = self.pos
        val = pos.last_val["val_loss"] if pos.last_val else None
        rate = pos.chars / pos.train_seconds if pos.train_seconds > 0 else 0.0
        return progress.Tick(pos.step, self.budget.total_steps, pos.train_seconds, self.budget.time_budget,
                             pos.loss_smooth, val, rate)

    def validate(self, bar: progress.Progress) -> None:
        pos, cfg = self.pos, self.cfg
        ev = evaluate(self.model, self.val_ids, cfg.val_streams, max(cfg.seq_len, 256), self.device, cfg.seed,
                      cfg.window_se)
        pos.eval_seconds += ev.seconds
        if not (math.isfinite(ev.carried) and math.isfinite(ev.windowed)):
            self.diverged(f"the validation loss is {ev.carried} (carried), {ev.windowed} (windowed)")
        record = ev.record()
        improved = ev.carried < pos.best_val
        pos.last_val, pos.last_val_step = record, pos.step
        if improved:
            pos.best_val, pos.best_step, pos.best = ev.carried, pos.step, record
            self.save_best()
        self.emit({"event": "val", "step": pos.step, "chars": pos.chars, **record, "best_val_loss": pos.best_val,
                   "elapsed": round(pos.train_seconds, 3)})
        bar.note(f"step {pos.step}: val {ev.carried:.4f} nats/char ({ev.carried_bpc:.3f} bits/char) carried, "
                 f"{ev.windowed:.4f} ± {ev.windowed_se:.4f} ({ev.windowed_bpc:.3f} bits/char) over {ev.windows} "
                 f"windows of {ev.window} ({ev.tilings} tilings); {ev.seconds:.1f}s" + (" (best, saved)" if improved else ""))
        self.draw()

    def diverged(self, what: str) -> NoReturn:
        kept = []
        for name, label in ((checkpoint.FILENAME, "best validation"), (checkpoint.LAST, "latest")):
            if (self.out / name).exists():
                step = checkpoint.load(self.out, name)["summary"]["steps"]
                kept.append(f"{self.out / name} ({label}, step {step})")
        self.emit({"event": "diverged", "step": self.pos.step, "what": what})
        raise Diverged(f"step {self.pos.step}: {what}; training stopped. Kept: "
                       + (", ".join(kept) if kept else "no checkpoint yet")
                       + ". Lower --lr, or keep --grad-clip on, and start again with --overwrite")

    def train_step(self) -> None:
        pos, cfg = self.pos, self.cfg
        if pos.chunk == 0:
            self.state = self.model.init_state(cfg.batch_size, self.device)  # reset at every epoch start
        t = pos.chunk * cfg.seq_len
        x = self.inputs[:, t : t + cfg.seq_len].to(self.device)
        y = self.targets[:, t : t + cfg.seq_len].to(self.device)
        lr = _lr_at(cfg, pos.step, self.budget.progress(pos))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits, state = self.model(x, self.state)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        value = loss.item()
        if not math.isfinite(value):
            pos.step += 1  # name the step that failed; nothing of it is applied or saved
            self.diverged(f"the training loss is {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.state = state.detach()  # truncated BPTT: carry the value, not the graph
        pos.step += 1
        pos.chunk += 1
        pos.chars += y.numel()
        if pos.chunk == self.windows:
            pos.chunk, pos.epoch = 0, pos.epoch + 1
        pos.last_train_loss = value
        # an exponential average over ~10 steps: the bar and the plot show the trend, not each batch's noise,
        # and lag the fast early descent by little
        pos.loss_smooth = value if math.isnan(pos.loss_smooth) else 0.9 * pos.loss_smooth + 0.1 * value
        if pos.step % 10 == 0 or pos.step == 1:
            self.emit({"event": "train", "step": pos.step, "epoch": pos.epoch, "loss": value,
                       "loss_smooth": pos.loss_smooth, "lr": lr, "chars": pos.chars,
                       "elapsed": round(pos.train_seconds, 3)})

    def loop(self) -> dict:
        pos, run = self.pos, self.run
        with StopRequests() as stops, progress.make(run.progress, run.log_every) as bar:
            if self.saved is None:
                self.metrics.write_text("")
                if self.val_ids is not None:
                    self.validate(bar)  # step 0: where the untrained model stands, under both protocols
                self.save_last()  # every run folder holds a last.pt, so any kill can be resumed
            while not self.budget.done(pos) and stops.received is None:
                began = time.monotonic()
                self.train_step()
                pos.train_seconds += time.monotonic() - began
                if self.val_ids is not None and pos.step % self.cfg.eval_every == 0:
                    self.validate(bar)
                if pos.step % run.save_every == 0:
                    self.save_last()
                bar.update(self.tick())  # after validating, so the bar and lines show this step's figure
            if stops.received is not None:
                self.interrupted = stops.received.name
                self.save_last()
                self.emit({"event": "interrupted", "step": pos.step, "signal": self.interrupted})
                log.warning("%s: stopped after step %d; saved %s (continue with --resume); exiting %d",
                            self.interrupted, pos.step, self.out / checkpoint.LAST, stops.exit_code)
                return self.result(exit_code=stops.exit_code)
            if self.val_ids is not None and pos.last_val_step != pos.step:
                self.validate(bar)  # the final weights get their chance to be the best
                bar.update(self.tick())
            if self.val_ids is None:
                self.save_best()  # nothing to select on: keep the last weights
            self.save_last()
        result = self.result(exit_code=0)
        self.emit({"event": "done", "step": pos.step, **result})
        self.draw()
        return result

    def result(self, exit_code: int) -> dict:
        return {**self.summary(), "interrupted": self.interrupted, "exit_code": exit_code,
                "resumed_from": None if self.saved is None else self.saved["resume"]["position"]["step"]}


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf  # a line cut short by a kill


def train(corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions = RunOptions()) -> dict:
    """Train into cfg.out (or continue there, with run.resume) and return the training summary.

    The summary's exit_code is 0, or 128 + the signal's number when SIGINT or SIGTERM stopped the run;
    nothing_to_do is set when a resumed run had already spent its budget.
    """
    session = _Run(corpus, model_cfg, cfg, run)
    if session.saved is not None:
        session.restore(session.saved)
        if session.budget.done(session.pos):
            log.warning("%s: this run already finished (step %d) within its budget; nothing to do (raise --steps, "
                        "--epochs or --time-budget to train further)", session.out / checkpoint.LAST,
                        session.pos.step)
            return {**session.result(exit_code=0), "nothing_to_do": True}
        session.emit({"event": "resume", "step": session.pos.step})
        log.info("resuming %s at step %d (epoch %d)", session.out / checkpoint.LAST, session.pos.step,
                 session.pos.epoch)
    n_params = sum(p.numel() for p in session.model.parameters())
    log.info("corpus %s: %d chars (%d train, %d val), vocab %d; %s %dx%d, %d parameters, %s, %d steps/epoch",
             corpus.name, len(session.ids), session.train_chars,
             0 if session.val_ids is None else len(session.val_ids), len(corpus.vocab), model_cfg.cell,
             model_cfg.num_layers, model_cfg.hidden_size, n_params, session.device, session.windows)
    return {**session.loop(), "nothing_to_do": False}
