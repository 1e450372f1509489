"""Judge an exported model on any text, from the ONNX file alone (onnxruntime and numpy; no torch).

    python -m export.evaluate runs/demo/model.onnx corpus.txt            # its last 10%, as training held out
    python -m export.evaluate runs/demo/model.onnx other.txt --whole     # every character of another text

Both of training's validation protocols (train/evaluate.py), in nats/char and bits/char:
  carried   the text in --streams contiguous streams, the state carried from window to window;
  windowed  256-character windows from the zero state, seeded whole tilings until SE <= --target-se.
By default the text is split as training splits its corpus (the last --val-fraction 0.1, contiguous) and the
tilings follow training's default --seed 1337, so on the training corpus the figures repeat the file's
metadata (val_loss, val_loss_windowed), which are printed beside them. A character outside the model's
vocabulary is an error (exit 2) naming it: a model cannot score what it cannot read, and dropping it would
score a different text.

Exit status: 0 evaluated; 2 the model, the text or an option is unusable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from train.protocol import CARRIED_STREAMS, TARGET_SE, WINDOW, WINDOWS_PER_BATCH, read_tilings, stream_length

CHUNK = 256  # characters per carried-protocol call (training reads max(seq_len, 256); the state carries)
LN2 = math.log(2.0)


class EvaluateError(Exception):
    """The model or the text cannot be evaluated."""


class Figures(NamedTuple):
    chars: int  # characters evaluated (the held-out part, or the whole text)
    carried: float  # nats/char
    windowed: float
    windowed_se: float
    windows: int
    window: int
    tilings: int
    metadata: dict[str, str]  # the file's metadata_props (val_loss, val_loss_windowed, corpus, ...)


class _Model:
    def __init__(self, path: Path) -> None:
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EvaluateError(f"{path}: not a loadable ONNX model ({exc})") from exc
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            self.vocab = json.loads(self.meta["vocab"])
            self.layers, self.state_size = int(self.meta["num_layers"]), int(self.meta["state_size"])
        except (KeyError, ValueError) as exc:
            raise EvaluateError(f"{path}: not a charrnn model (metadata: {exc})") from exc

    def encode(self, text: str) -> np.ndarray:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            first = min(text.index(ch) for ch in unknown)
            shown = ", ".join(repr(ch) for ch in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise EvaluateError(f"{len(unknown)} character(s) outside the model's vocabulary of {len(self.vocab)}: "
                                f"{shown} (first at offset {first})")
        return np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))

    def zero_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.layers, self.state_size), dtype=np.float32)

    def nll(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-position nats of ids[:, 1:] given ids[:, :-1] (float64), and the state after ids[:, :-1]."""
        logits, state = self.session.run(["logits", "state_out"], {"input_ids": ids[:, :-1], "state_in": state})
        logits = logits.astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        return log_z - picked, state


def carried(model: _Model, ids: np.ndarray, n_streams: int = CARRIED_STREAMS) -> float:
    n_streams, length = stream_length(len(ids), n_streams)
    rows = ids[: n_streams * length + 1]
    # row b reads rows[b * length : (b + 1) * length] and predicts one further: an overlap of one character
    text = np.stack([rows[b * length : (b + 1) * length + 1] for b in range(n_streams)])
    state, total = model.zero_state(n_streams), 0.0
    for t in range(0, length, CHUNK):
        nats, state = model.nll(text[:, t : t + CHUNK + 1], state)
        total += float(nats.sum())
    return total / (n_streams * length)


def evaluate_file(model_path: Path, text_path: Path, val_fraction: float | None = 0.1, seed: int = 1337,
                  n_streams: int = CARRIED_STREAMS, target_se: float = TARGET_SE) -> Figures:
    """Both protocols on the last val_fraction of the text (None: the whole text)."""
    model = _Model(model_path)
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluateError(f"{text_path}: not readable UTF-8 text ({exc})") from exc
    ids = model.encode(text)
    if val_fraction is not None:
        ids = ids[len(ids) - int(len(ids) * val_fraction) :]  # train/data.py's split
    if len(ids) < 3:
        raise EvaluateError(f"{text_path}: {len(ids)} characters to evaluate; at least 3 are needed")

    def window_losses(starts: np.ndarray, window: int) -> np.ndarray:
        out = []
        for first in range(0, len(starts), WINDOWS_PER_BATCH):
            batch = starts[first : first + WINDOWS_PER_BATCH]
            nats, _ = model.nll(ids[batch[:, None] + np.arange(window + 1)], model.zero_state(len(batch)))
            out.append(nats.mean(axis=1))
        return np.concatenate(out)

    win = read_tilings(len(ids), seed, window_losses, WINDOW, target_se)
    return Figures(len(ids), carried(model, ids, n_streams), win.mean, win.se, win.windows, win.window,
                   win.tilings, model.meta)


def report(fig: Figures) -> list[str]:
    meta = fig.metadata

    def recorded(key: str) -> str:
        return f" (metadata {key} {meta[key]})" if meta.get(key) else ""

    return [
        f"{fig.chars} characters evaluated",
        f"carried  {fig.carried:.4f} nats/char ({fig.carried / LN2:.3f} bits/char){recorded('val_loss')}",
        f"windowed {fig.windowed:.4f} ± {fig.windowed_se:.4f} nats/char ({fig.windowed / LN2:.3f} bits/char) over "
        f"{fig.windows} windows of {fig.window} ({fig.tilings} tilings){recorded('val_loss_windowed')}",
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="an exported model.onnx")
    p.add_argument("text", type=Path, help="a UTF-8 text file")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--val-fraction", type=float, default=0.1,
                       help="evaluate the last fraction of the text, as training holds it out (default 0.1)")
    which.add_argument("--whole", action="store_true", help="evaluate every character of the text")
    p.add_argument("--seed", type=int, default=1337, help="the tilings' order (training's --seed; default 1337)")
    p.add_argument("--streams", type=int, default=CARRIED_STREAMS, help="carried-protocol streams (default 8)")
    p.add_argument("--target-se", type=float, default=TARGET_SE,
                   help=f"windowed protocol: read tilings until the standard error is this small ({TARGET_SE})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.whole and not 0.0 < args.val_fraction <= 1.0:
        print("export.evaluate: error: --val-fraction must be in (0, 1]", file=sys.stderr)
        return 2
    if args.streams < 1 or args.target_se <= 0:
        print("export.evaluate: error: --streams must be >= 1 and --target-se > 0", file=sys.stderr)
        return 2
    try:
        fig = evaluate_file(args.model, args.text, None if args.whole else args.val_fraction, args.seed,
                            args.streams, args.target_se)
    except EvaluateError as exc:
        print(f"export.evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.text}" + (" (whole text)" if args.whole else f" (last {args.val_fraction:g})"))
    print("\n".join(report(fig)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
