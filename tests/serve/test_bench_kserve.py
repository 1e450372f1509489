"""bench/kserve.py shrunk: the Generate load and both tritonclient loads run against one server without
errors, and the report has its rows and ratios. Speed is not judged here (see docs/performance.md)."""

from __future__ import annotations

import re
import subprocess
import sys

from support import ROOT
from tritonenv import triton_python


def test_kserve_benchmark_runs_end_to_end(hihell_model):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kserve.py"), "--model", str(hihell_model),
                           "--streams", "3", "--chars", "6", "--rounds", "1", "--triton-python", str(triton_python())],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    for load in ("generate", "modelinfer", "stream"):
        for streams in ("3 streams", "1 stream "):
            row = re.search(rf"^\s*{load}\s+{streams}\s+(\d+)\s.*\s(\d+)$", out, re.M)
            assert row, f"no {load!r} {streams!r} row in:\n{out}"
            assert int(row.group(1)) > 0 and row.group(2) == "0"  # chars/s, errors
    assert re.search(r"modelinfer / generate,   3 streams: chars/s \d+\.\d\d  \(rounds ", out), out
    assert re.search(r"stream / generate,   1 stream : chars/s \d+\.\d\d", out), out
