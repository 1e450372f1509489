"""Export a trained run folder to ONNX and prove the file before reporting success.

    python -m export runs/demo          # reads runs/demo/checkpoint.pt, writes runs/demo/model.onnx

Exit status: 0 when the file conforms to the contract and matches PyTorch within 1e-4 (relative to the
outputs' size where they exceed 1); 1 when a check
fails, NaN or infinite weights or outputs included (nothing is left at the output path); 2 when the
checkpoint is missing or unreadable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from export.check import TOLERANCE, verify
from export.to_onnx import provenance_of, rebuild, to_onnx
from train.checkpoint import CheckpointError, load


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="folder holding checkpoint.pt (as written by python -m train)")
    p.add_argument("--out", type=Path, help="output file (default: RUN_DIR/model.onnx)")
    return p


def export(run_dir: Path, out: Path | None = None) -> int:
    out = out or run_dir / "model.onnx"
    try:
        ckpt = load(run_dir)
        model = rebuild(ckpt)
    except CheckpointError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # config or weights do not fit together
        print(f"export: error: {run_dir}: checkpoint does not rebuild a model ({exc})", file=sys.stderr)
        return 2
    proto = to_onnx(model, ckpt["vocab"], provenance_of(ckpt["summary"]))
    report = verify(proto, model)
    cfg = model.config
    print(f"export {run_dir}: {cfg.cell} {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"state [batch, {cfg.num_layers}, {cfg.state_size}]")
    print("\n".join(report.lines()))
    if not report.ok:
        print(f"export: FAILED, {out} not written", file=sys.stderr)
        return 1
    data = proto.SerializeToString()  # one self-contained file: no external data beside it
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the serving container reads it as another user
    os.replace(tmp, out)
    print(f"wrote {out} ({len(data) / 1024:.0f} KiB); all checks within {TOLERANCE:g} x max(1, |output|)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return export(args.run_dir, args.out)


if __name__ == "__main__":
    sys.exit(main())
