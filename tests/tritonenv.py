"""Run the tritonclient side of an interop test in .venv-triton, the environment tritonclient needs.

tritonclient[grpc] requires protobuf<7 and the project pins protobuf 7, so tritonclient cannot be
imported in .venv. `make install` builds .venv-triton from requirements/tritonclient.txt; a test calls
`run_tritonside("script.py", ...)`, which runs tests/tritonside/script.py with that environment's Python
(tritonclient and the standard library only: no project code) and returns the JSON it printed. All of it
stays in the one pytest run. Without the environment the test is skipped, saying how to make it; under
CI (CI set and not false) it fails instead, so a CI run cannot go green by skipping the interop tests.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import ROOT

TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
SCRIPTS = ROOT / "tests" / "tritonside"


def triton_python() -> Path:
    """The triton environment's interpreter; skips the calling test without it (fails under CI)."""
    if os.access(TRITON_PYTHON, os.X_OK):
        return TRITON_PYTHON
    message = f"{TRITON_PYTHON} is missing: `make install` creates it"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message} (CI must run the tritonclient tests, not skip them)", pytrace=False)
    pytest.skip(message)


def run_tritonside(script: str, *args: str, stdin: Any = None, timeout: float = 120) -> Any:
    """Run tests/tritonside/SCRIPT with the triton environment's Python; return its stdout parsed as JSON.

    STDIN, when given, is sent to the script as JSON.
    """
    proc = subprocess.run([str(triton_python()), str(SCRIPTS / script), *args], cwd=ROOT,
                          input=None if stdin is None else json.dumps(stdin),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"tritonside/{script} {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return json.loads(proc.stdout)
