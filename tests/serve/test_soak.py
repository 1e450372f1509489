"""A short soak (bench/soak.py): 32 callers of mixed calls for 5 s, no errors, bounded memory growth."""

from __future__ import annotations

import json
import subprocess
import sys

from support import ROOT


def test_short_soak_has_no_errors_and_no_memory_growth(text_model):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--model", str(text_model),
                           "--callers", "32", "--seconds", "5", "--warmup", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert result["errors"] == 0 and result["chars"] > 0
    assert all(result["calls"].get(kind, 0) > 0 for kind in ("Generate", "Predict", "Step"))
    assert result["rss_growth"] < 0.10
