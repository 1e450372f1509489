"""How a run shows its progress: a tqdm bar on a terminal, plain lines elsewhere (CI, compose logs), or
nothing (--quiet). The loop hands each of them the same Tick and knows nothing of terminals."""

from __future__ import annotations

import logging
import os
import sys
from typing import NamedTuple, Protocol

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("train.loop")


class Tick(NamedTuple):
    """Where training stands after a step. Seconds are training seconds (evaluation excluded)."""

    step: int
    total_steps: int | None  # the step (or epoch) budget; None with a time budget only
    train_seconds: float
    time_budget: float | None
    loss: float  # smoothed training loss, nats/char
    val: float | None  # the last carried-state validation loss
    chars_per_s: float

    def done_total(self) -> tuple[float, float, str]:
        """Progress as (done, total, unit): steps when a step budget is set, else budget seconds."""
        if self.total_steps is not None:
            if self.time_budget is None or self.step / self.total_steps >= self.train_seconds / self.time_budget:
                return self.step, self.total_steps, "steps"
        assert self.time_budget is not None
        return min(self.train_seconds, self.time_budget), self.time_budget, "s"

    def eta(self) -> float | None:
        done, total, unit = self.done_total()
        if unit == "s":
            return total - done
        if self.step == 0 or self.train_seconds <= 0:
            return None
        return (total - done) * self.train_seconds / self.step

    def fields(self) -> str:
        val = "-" if self.val is None else f"{self.val:.4f}"
        return f"train {self.loss:.4f} | val {val} | {self.chars_per_s / 1000:.1f}k chars/s"


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _clock(seconds: float | None) -> str:
    return "?" if seconds is None else tqdm.format_interval(max(0.0, seconds))


class Progress(Protocol):
    def __enter__(self) -> Progress: ...
    def __exit__(self, *exc: object) -> None: ...
    def update(self, tick: Tick) -> None: ...
    def note(self, message: str) -> None: ...


class Bar:
    """A tqdm bar on stderr: done/total, the Tick's fields, elapsed<ETA."""

    FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} | {desc} [{elapsed}<{remaining}]"

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.redirect = logging_redirect_tqdm()

    def __enter__(self) -> Bar:
        self.redirect.__enter__()  # log lines go above the bar instead of through it
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        self.redirect.__exit__(*exc)

    def update(self, tick: Tick) -> None:
        done, total, unit = tick.done_total()
        if self.bar is None or self.bar.unit != unit:
            if self.bar is not None:
                self.bar.close()
            # A terminal that reports no size (0x0, as a bare pty does) would get an invisible bar: 100x24.
            resizes = _columns(self.stream) > 0
            total = int(total) if float(total).is_integer() else total  # "100 s", not "100.0 s"
            self.bar = tqdm(total=total, initial=int(done), unit=unit, file=self.stream, dynamic_ncols=resizes,
                            ncols=None if resizes else 100, nrows=None if resizes else 24,
                            bar_format=self.FORMAT, smoothing=0.05)
        self.bar.set_description_str(tick.fields(), refresh=False)
        self.bar.update(int(done) - self.bar.n)  # redraws at most every 0.1 s (tqdm's mininterval)

    def note(self, message: str) -> None:
        tqdm.write(message, file=self.stream)


class Lines:
    """One log line every `every` steps with the bar's fields, for logs that are not a terminal."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.shown = -1  # the last step a line was written for: a step updated twice gets one line

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, tick: Tick) -> None:
        if tick.step % self.every or tick.step == self.shown:
            return
        self.shown = tick.step
        done, total, unit = tick.done_total()
        shown = f"{int(done)}/{int(total)} {unit}"
        log.info("step %d | %s (%3.0f%%) | %s | elapsed %s | ETA %s", tick.step, shown, 100 * done / total,
                 tick.fields(), _clock(tick.train_seconds), _clock(tick.eta()))

    def note(self, message: str) -> None:
        log.info("%s", message)


class Quiet:
    """--quiet: neither bar nor lines (warnings and errors still reach stderr)."""

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, tick: Tick) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def make(mode: str, log_every: int) -> Progress:
    """mode: 'auto' (a bar when stderr is a terminal, else lines), 'bar', 'lines' or 'quiet'."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "lines"
    if mode == "bar":
        return Bar()
    if mode == "lines":
        return Lines(log_every)
    if mode == "quiet":
        return Quiet()
    raise ValueError(f"progress must be auto, bar, lines or quiet, got {mode!r}")
