"""Export a trained run folder to ONNX and prove the file before reporting success.

    python -m export runs/demo          # reads runs/demo/checkpoint.pt, writes runs/demo/model.onnx
    python -m export runs/demo --triton-repo models   # and models/charrnn/{config.pbtxt,1/model.onnx}

Exit status: 0 when the file conforms to the contract and matches PyTorch within 1e-4 (relative to the
outputs' size where they exceed 1); 1 when the exporter or a check fails, NaN or infinite weights or
outputs included (nothing is left at the output path); 2 when the checkpoint is missing or unreadable, or
the Triton repository cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.check import TOLERANCE, verify
from export.files import write_atomically
from export.to_onnx import ExportError, provenance_of, rebuild, to_onnx
from export.triton_repo import TritonModel, check_name, write_repository
from train.checkpoint import CheckpointError, load


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="folder holding checkpoint.pt (as written by python -m train)")
    p.add_argument("--out", type=Path, help="output file (default: RUN_DIR/model.onnx)")
    p.add_argument("--triton-repo", type=Path, metavar="REPO",
                   help="also write a Triton model repository: REPO/NAME/config.pbtxt (onnxruntime, sequence "
                        "batching with implicit state) and REPO/NAME/1/model.onnx")
    p.add_argument("--triton-name", type=_model_name, default="charrnn", metavar="NAME",
                   help="the model's name in the Triton repository (default: charrnn)")
    return p


def _model_name(text: str) -> str:
    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def export(run_dir: Path, out: Path | None = None, triton_repo: Path | None = None,
           triton_name: str = "charrnn") -> int:
    out = out or run_dir / "model.onnx"
    if triton_repo is not None and triton_repo.exists() and not triton_repo.is_dir():
        print(f"export: error: --triton-repo {triton_repo} is not a directory", file=sys.stderr)
        return 2
    try:
        ckpt = load(run_dir)
        model = rebuild(ckpt)
    except CheckpointError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # config or weights do not fit together
        print(f"export: error: {run_dir}: checkpoint does not rebuild a model ({exc})", file=sys.stderr)
        return 2
    try:
        proto = to_onnx(model, ckpt["vocab"], provenance_of(ckpt["summary"]))
    except ExportError as exc:
        print(f"export: error: {run_dir}: the exporter failed ({exc}); {out} not written", file=sys.stderr)
        return 1
    report = verify(proto, model)
    cfg = model.config
    print(f"export {run_dir}: {cfg.cell} {cfg.num_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"state [batch, {cfg.num_layers}, {cfg.state_size}]")
    print("\n".join(report.lines()))
    if not report.ok:
        print(f"export: FAILED, {out} not written", file=sys.stderr)
        return 1
    data = proto.SerializeToString()  # one self-contained file: no external data beside it
    write_atomically(out, data)
    print(f"wrote {out} ({len(data) / 1024:.0f} KiB); all checks within {TOLERANCE:g} x max(1, |output|)")
    if triton_repo is not None:
        meta = {p.key: p.value for p in proto.metadata_props}
        triton = TritonModel.of(meta, triton_name, (o.name for o in proto.graph.output))
        try:
            config, copy = write_repository(triton_repo, triton, data)
        except OSError as exc:
            print(f"export: error: cannot write the Triton repository {triton_repo}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {config} and {copy} (Triton: sequence batching, implicit state "
              f"[{cfg.num_layers}, {cfg.state_size}])")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return export(args.run_dir, args.out, args.triton_repo, args.triton_name)


if __name__ == "__main__":
    sys.exit(main())
