"""The training loop: stateful truncated BPTT over contiguous streams, validation under two protocols at
step 0, every eval_every steps and at the end, the best-validation checkpoint, last.pt for an exact
--resume, metrics appended to DIR/metrics.jsonl and DIR/loss.png redrawn as training runs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from train import checkpoint, distributed, noise, plot, progress, rundir
from train.averaging import Average
from train.data import Corpus, split, streams
from train.distributed import World
from train.evaluate import LN2, evaluate
from train.model import CharRNN, ModelConfig
from train.signals import StopRequests

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    dtype: str = "float32"  # bfloat16: autocast the training step (evaluation and the weights stay float32)
    compile: bool = False  # torch.compile the training step's module (CUDA only)
    tf32: bool = True  # on CUDA, float32 matmuls may use TF32 tensor cores (10 mantissa bits: ample for SGD)
    # Regularizers, all off here; the CLI's text preset turns --ema on (0.99): docs/training-regularizers.md
    weight_drop: float = 0.0  # DropConnect on each layer's weight_hh, one mask per batch (AWD-LSTM: 0.2-0.5)
    locked_input: float = 0.0  # locked dropout on the embedding, one mask per sequence held over time
    locked_hidden: float = 0.0  # locked dropout between layers
    locked_output: float = 0.0  # locked dropout on the top layer's output, before the projection
    ema: float = 0.0  # decay of the weights' moving average that is judged and exported; 0 = off
    forget_bias: float | None = None  # LSTM forget-gate bias at start; None = PyTorch's uniform init

    @property
    def rates(self) -> noise.Rates:
        return noise.Rates(self.locked_input, self.locked_hidden, self.locked_output, self.weight_drop)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
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
        _ = self.rates  # building them checks the drop rates
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (0 = off), got {self.ema}")


@dataclass(frozen=True)
class RunOptions:
    """How this invocation runs, not what it trains: --resume may change these freely."""

    resume: str | None = None  # None: a fresh run (a used folder is refused); "yes": continue last.pt; "auto"
    overwrite: bool = False  # replace the trainer's files in the folder (never model.onnx)
    save_every: int = 200  # last.pt every N steps: a kill loses at most N steps (a save takes milliseconds)
    log_every: int = 100  # plain progress lines every N steps when stderr is not a terminal
    progress: str = "lines"  # auto (bar on a terminal, else lines) | bar | lines | quiet
    # the options the command line left to their default: on --resume, those whose default changed since the
    # run began keep last.pt's value (rundir.CHANGED_DEFAULTS)
    unset: frozenset[str] = frozenset()

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
    best: dict[str, Any] | None = None  # the best validation's record (both protocols)
    last_val: dict[str, Any] | None = None
    last_val_step: int = -1
    loss_smooth: float = math.nan
    last_train_loss: float = math.nan


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this torch build sees no CUDA device")
    return torch.device(name)


def _device(name: str, world: World) -> torch.device:
    """Under torchrun each rank of a node takes the GPU of its local rank."""
    device = resolve_device(name)
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.size > 1 else device


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
                 cfg: TrainConfig) -> tuple[dict[str, Any] | None, TrainConfig]:
    """Apply --overwrite / --resume to the run folder: the last.pt to continue from (None to start) and the
    settings to train with (cfg, but a resumed run keeps the old value of a default changed since it began)."""
    files = rundir.held(out)
    if run.overwrite:
        removed = rundir.clear(out)
        if removed:
            log.warning("--overwrite: removed %s from %s (model.onnx, if any, is left for whoever serves it)",
                        ", ".join(removed), out)
        return None, cfg
    if run.resume:
        if (out / checkpoint.LAST).exists():
            saved = checkpoint.load(out, checkpoint.LAST)
            kept = rundir.kept_defaults(saved, rundir.config_dict(cfg), run.unset)
            if kept:
                cfg = replace(cfg, **kept)
                log.warning("--resume: keeps %s, as %s was trained (the default changed since that run began, "
                            "and a run cannot change it midway)", ", ".join(f"{k}={v!r}" for k, v in kept.items()),
                            out / checkpoint.LAST)
            problems = rundir.mismatches(saved, sha256, corpus.vocab, model_cfg.to_dict(), rundir.config_dict(cfg))
            if problems:
                raise rundir.RunDirError(
                    f"{out / checkpoint.LAST} is another run: " + "; ".join(problems) + ". --resume may change "
                    "only the budget (--steps, --epochs, --time-budget); --overwrite starts afresh")
            return saved, cfg
        if files:
            raise rundir.RunDirError(f"{out} holds {', '.join(files)} but no {checkpoint.LAST} to resume from; "
                                     "--overwrite replaces that run")
        if run.resume == "auto":
            return None, cfg
        raise rundir.RunDirError(f"{out}: no run to resume (no {checkpoint.LAST}); --resume auto starts one")
    if files:
        raise rundir.refuse_used(out, files)
    return None, cfg


class _Run:
    """One training session over a run folder: the model, its optimizer and where the loop stands."""

    def __init__(self, corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions,
                 world: World) -> None:
        self.corpus, self.model_cfg, self.cfg, self.run, self.world = corpus, model_cfg, cfg, run, world
        self.out = Path(cfg.out)
        if cfg.forget_bias is not None and model_cfg.cell != "lstm":
            raise ValueError(f"--forget-bias sets the LSTM forget gate; --cell {model_cfg.cell} has none")
        if cfg.batch_size % world.size:
            raise ValueError(f"--batch-size {cfg.batch_size} does not divide among {world.size} processes: each "
                             "takes an equal contiguous share of the streams (global batch = --batch-size)")
        self.device = _device(cfg.device, world)
        if cfg.compile and self.device.type != "cuda":
            raise ValueError("--compile is supported on CUDA only (on the CPU it is untested here, and inductor "
                             "needs a C++ toolchain); drop it, or train with --device cuda")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        # autocast in bfloat16: on CUDA the recurrent cell and the projection; on the CPU only what CPU autocast
        # lists (the projection), the cell stays float32. No gradient scaler: bfloat16 has float32's range.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        if world.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.sha256 = rundir.corpus_sha256(corpus.text)
        self.ids = corpus.encode(corpus.text)
        train_ids, val_ids = split(self.ids, cfg.val_fraction)
        self.train_chars = len(train_ids)
        self.val_ids = val_ids if len(val_ids) >= 2 else None  # the seed lesson has none: keep the last weights
        inputs, targets = streams(train_ids, cfg.batch_size)  # may refuse the text: before any file
        self.rows = world.share(cfg.batch_size)  # equal shares: the batch divides among the ranks
        self.inputs, self.targets = inputs[self.rows], targets[self.rows]  # this rank's contiguous streams
        self.saved, self.cfg = self._open(corpus, model_cfg)
        cfg = self.cfg  # a resumed run may keep last.pt's value of a changed default
        self.metrics = self.out / rundir.METRICS

        torch.manual_seed(cfg.seed)
        self.windows = math.ceil(self.inputs.shape[1] / cfg.seq_len)  # per epoch
        self.budget = _Budget(cfg, self.windows)
        self.model = CharRNN(self.model_cfg).to(self.device)
        if cfg.forget_bias is not None:
            self.model.set_forget_bias(cfg.forget_bias)
        self.average = Average(self.model, cfg.ema) if cfg.ema else None
        self.masks = noise.Masks(cfg.rates, model_cfg, cfg.batch_size, self.rows, cfg.seed, self.device)
        self.net: Callable[..., Any] = self.model  # what the training step calls: the DDP wrapper under torchrun
        if world.size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model)  # averages gradients in backward
            torch.manual_seed(cfg.seed + world.rank)  # the same initial weights, but each rank its own dropout
        if cfg.compile:
            self.net = torch.compile(self.net)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        decay = cfg.weight_decay if cfg.optimizer == "adamw" else 0.0
        # fused: one kernel for the whole update on CUDA; the CPU keeps the default (foreach) path, whose
        # results the exact-resume tests pin
        fused: dict[str, Any] = {"fused": True} if cuda else {}
        self.optimizer = opt_cls(self.model.parameters(), lr=cfg.lr, weight_decay=decay, **fused)
        self.pos = Position()
        self.state = self.model.init_state(len(self.inputs), self.device)
        self.started = time.monotonic()
        self.interrupted: str | None = None

    @property
    def judged(self) -> CharRNN:
        """The weights validation judges and checkpoint.pt holds: their average under --ema."""
        return self.model if self.average is None else self.average.model

    # --- files -------------------------------------------------------------------------------------
    def _open(self, corpus: Corpus, model_cfg: ModelConfig) -> tuple[dict | None, TrainConfig]:
        """Rank 0 applies --overwrite / --resume and hands every rank its verdict (and last.pt and the settings
        it keeps, so that no other node needs to see the run folder)."""
        failure, saved, cfg = None, None, self.cfg
        if self.world.main:
            try:
                saved, cfg = _open_folder(self.out, self.run, self.sha256, corpus, model_cfg, self.cfg)
                ranks = 1 if saved is None else saved["resume"].get("world_size", 1)
                if saved is not None and ranks != self.world.size:
                    raise rundir.RunDirError(
                        f"{self.out / checkpoint.LAST} was saved by {ranks} process(es), this run has "
                        f"{self.world.size}: its carried state and RNG states are per process, so resume with "
                        f"--nproc-per-node {ranks} (or --overwrite to start afresh)")
            except (rundir.RunDirError, checkpoint.CheckpointError) as exc:
                failure = exc
        failure, saved, cfg = self.world.broadcast((failure, saved, cfg))
        if failure is not None:
            raise failure
        return saved, cfg

    def emit(self, record: dict) -> None:
        if not self.world.main:
            return
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _payload(self) -> dict[str, Any]:
        return {
            "model_state": {k: v.detach().cpu() for k, v in self.judged.state_dict().items()},
            "model_config": self.model_cfg.to_dict(),
            "vocab": list(self.corpus.vocab),
            "summary": self.summary(),
            "train_config": rundir.config_dict(self.cfg),
        }

    def save_best(self) -> None:
        if self.world.main:
            checkpoint.save(self.out / checkpoint.FILENAME, self._payload())

    def save_last(self) -> None:
        """Every rank's carried-state slice and RNG states, gathered; rank 0 writes them."""
        parts = self.world.gather((self.state.detach().cpu(), rundir.rng_states()))
        if not self.world.main:
            return
        checkpoint.save(self.out / checkpoint.LAST, {
            **self._payload(),
            "corpus_sha256": self.sha256,
            "resume": {"position": {**asdict(self.pos), "wall_seconds": self.summary()["seconds"]},
                       "state": torch.cat([state for state, _ in parts]),
                       "optimizer": self.optimizer.state_dict(), "rng": parts[0][1],
                       "world_size": self.world.size, "rng_ranks": [rng for _, rng in parts],
                       **({} if self.average is None else {"weights": {
                           k: v.detach().cpu() for k, v in self.model.state_dict().items()}})},
        })

    def restore(self, saved: dict[str, Any]) -> None:
        resume = saved["resume"]
        # under --ema model_state is the average and resume["weights"] the training weights
        self.model.load_state_dict(resume.get("weights", saved["model_state"]))
        if self.average is not None:
            self.average.model.load_state_dict(saved["model_state"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.pos = Position(**resume["position"])
        self.state = resume["state"][self.rows].to(self.device)
        rundir.restore_rng_states(resume["rng_ranks"][self.world.rank] if self.world.size > 1 else resume["rng"])
        if not self.world.main:
            return
        # A kill after the last save leaves records past it; they are about to be made again.
        kept = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and _record_step(line) <= self.pos.step] if self.metrics.exists() else []
        self.metrics.write_text("".join(line + "\n" for line in kept))

    def draw(self) -> None:
        if self.world.main:
            plot.draw([self.out], self.out / rundir.PLOT)

    def summary(self) -> dict[str, Any]:
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
            # what a regularizer costs per step shows here: it must win at equal wall time, not equal steps
            "chars_per_second": round(pos.chars / pos.train_seconds) if pos.train_seconds > 0 else 0,
            "device": str(self.device),
            "world_size": self.world.size,
            "torch_version": str(torch.__version__),
            # the wall-clock time these figures were taken (each save): export stamps it as exported_at, so
            # the same checkpoint always exports the same bytes
            "ended_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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
        assert self.val_ids is not None  # called only when there is a validation split
        ev = evaluate(self.judged, self.val_ids, cfg.val_streams, max(cfg.seq_len, 256), self.device, cfg.seed,
                      cfg.window_se, self.world)
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
                 f"windows of {ev.window} ({ev.tilings} tilings); {ev.seconds:.1f}s"
                 + (" (best, saved)" if improved else ""))
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
            self.state = self.model.init_state(len(self.inputs), self.device)  # reset at every epoch start
        t = pos.chunk * cfg.seq_len
        x = self.inputs[:, t : t + cfg.seq_len].to(self.device)
        y = self.targets[:, t : t + cfg.seq_len].to(self.device)
        lr = _lr_at(cfg, pos.step, self.budget.progress(pos))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            masks = self.masks.at(pos.step)
            # no masks, no argument: the call stays the plain contract one (and a spy on forward sees that)
            logits, state = self.net(x, self.state) if masks is None else self.net(x, self.state, masks)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        # every rank holds an equal share of the streams: the mean of their means is the global mean, and all
        # ranks see the same figure, so all of them stop together if it is not finite
        value = self.world.sum(loss.detach().clone()).item() / self.world.size
        if not math.isfinite(value):
            pos.step += 1  # name the step that failed; nothing of it is applied or saved
            self.diverged(f"the training loss is {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.model, pos.step)
        self.state = state.detach().float()  # truncated BPTT: carry the value, not the graph
        pos.step += 1
        pos.chunk += 1
        pos.chars += y.numel() * self.world.size
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

    def agree(self, stops: StopRequests) -> int:
        """The signal number that stops the run (0: none). Under DDP one all-reduce: a signal on any rank stops
        all after this step, and all follow the slowest clock, so a --time-budget ends every rank at the same
        step with the same learning rates."""
        if self.world.size == 1:
            return int(stops.received or 0)
        agreed = self.world.max(torch.tensor([float(stops.received or 0), self.pos.train_seconds],
                                             dtype=torch.float64, device=self.device))
        self.pos.train_seconds = float(agreed[1])
        return int(agreed[0])

    def loop(self) -> dict:
        pos, run = self.pos, self.run
        world = self.world
        # torchrun forwards a terminal's Ctrl-C to workers that already had it: under DDP the same request,
        # arriving twice within a second, is one request
        shown = run.progress if world.main else "quiet"
        with StopRequests(repeat_grace=1.0 if world.size > 1 else 0.0) as stops, \
                progress.make(shown, run.log_every) as bar:
            if self.saved is None:
                if world.main:  # rank 0 writes the run folder: on another node it need not exist at all
                    self.metrics.write_text("")
                if self.val_ids is not None:
                    self.validate(bar)  # step 0: where the untrained model stands, under both protocols
                self.save_last()  # every run folder holds a last.pt, so any kill can be resumed
            stopped = 0
            while not self.budget.done(pos) and not stopped:
                began = time.monotonic()
                self.train_step()
                pos.train_seconds += time.monotonic() - began
                stopped = self.agree(stops)
                if self.val_ids is not None and pos.step % self.cfg.eval_every == 0:
                    self.validate(bar)
                if pos.step % run.save_every == 0:
                    self.save_last()
                bar.update(self.tick())  # after validating, so the bar and lines show this step's figure
            stopped = stopped or self.agree(stops)  # a signal during the last step's validation or save counts
            if stopped:
                self.interrupted = signal.Signals(stopped).name
                self.save_last()
                self.emit({"event": "interrupted", "step": pos.step, "signal": self.interrupted})
                if world.main:
                    log.warning("%s: stopped after step %d; saved %s (continue with --resume); exiting %d",
                                self.interrupted, pos.step, self.out / checkpoint.LAST, 128 + stopped)
                return self.result(exit_code=128 + stopped)
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

    def result(self, exit_code: int) -> dict[str, Any]:
        return {**self.summary(), "interrupted": self.interrupted, "exit_code": exit_code,
                "resumed_from": None if self.saved is None else self.saved["resume"]["position"]["step"]}


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except json.JSONDecodeError:
        return math.inf  # a line cut short by a kill


def train(corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions = RunOptions(),
          world: World = distributed.ONE) -> dict:
    """Train into cfg.out (or continue there, with run.resume) and return the training summary.

    The summary's exit_code is 0, or 128 + the signal's number when SIGINT or SIGTERM stopped the run;
    nothing_to_do is set when a resumed run had already spent its budget.
    """
    distributed.start(world, _device(cfg.device, world))
    finished = False
    try:
        result = _train(corpus, model_cfg, cfg, run, world)
        finished = True
        return result
    finally:
        distributed.stop(world, finished=finished)


def _train(corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run: RunOptions, world: World) -> dict:
    session = _Run(corpus, model_cfg, cfg, run, world)
    if session.saved is not None:
        session.restore(session.saved)
        if session.budget.done(session.pos):
            if world.main:
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
