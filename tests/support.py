"""Helpers shared by tests (importable because pyproject puts tests/ on the path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_stage(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m <stage> ...` from the repository root, the way a user does."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
