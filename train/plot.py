"""Loss curves from run folders' metrics.jsonl: the smoothed training loss and both validation protocols
against characters seen. Training redraws DIR/loss.png at every validation; this compares runs:

    python -m train.plot runs/gru runs/lstm -o compare.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

METRICS = "metrics.jsonl"


class PlotError(Exception):
    """A run folder has nothing to plot."""


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.is_file():
        raise PlotError(f"{path}: no metrics (is {run} a run folder written by python -m train?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: the others still plot
    return records


def draw(runs: Sequence[Path], out: Path) -> Path:
    """Draw every run on one figure and write it atomically to out (PNG)."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot global state
    ax = fig.add_subplot()
    colours = [f"C{i}" for i in range(10)]
    for i, run in enumerate(runs):
        records = read_metrics(run)
        colour, name = colours[i % len(colours)], Path(run).name or str(run)
        prefix = "" if len(runs) == 1 else f"{name}: "
        train = [r for r in records if r.get("event") == "train"]
        vals = [r for r in records if r.get("event") == "val"]
        if not train and not vals:
            raise PlotError(f"{Path(run) / METRICS}: no training or validation records yet")
        if train:
            ax.plot([r["chars"] for r in train], [r.get("loss_smooth", r["loss"]) for r in train], color=colour,
                    alpha=0.6, linewidth=1.2, label=prefix + "train (smoothed)")
        if vals:
            chars = [r.get("chars", 0) for r in vals]
            ax.plot(chars, [r["val_loss"] for r in vals], "o-", color=colour, markersize=4,
                    label=prefix + "validation, carried state")
            windowed = [(c, r["val_loss_windowed"]) for c, r in zip(chars, vals) if "val_loss_windowed" in r]
            if windowed:
                ax.plot(*zip(*windowed), "s--", color=colour, markersize=4, markerfacecolor="none",
                        label=prefix + "validation, 256-char windows")
    ax.set_xlabel("characters seen")
    ax.set_ylabel("loss (nats/char)")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(", ".join(Path(r).name or str(r) for r in runs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="run folders (each with metrics.jsonl)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="FILE.png")
    args = p.parse_args(argv)
    try:
        print(f"wrote {draw(args.runs, args.out)}")
    except PlotError as exc:
        print(f"train.plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
