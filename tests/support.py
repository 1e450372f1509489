"""Helpers shared by tests (importable because pyproject puts tests/ on the path)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (for a program that takes a port number, not 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_stage(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m <stage> ...` from the repository root, the way a user does."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


STEP_LINE = re.compile(r"\bstep (\d+) \|")  # the trainer's plain progress line (no terminal), e.g. "step 40 |"


def interrupt_at_step(argv: list[str], at_step: int, interrupt: Callable[[subprocess.Popen], None],
                      limit: float = 180) -> tuple[int, str]:
    """Run a training command; once a progress line reports at_step, call interrupt(proc) (send a signal);
    wait for it to exit: (exit code, all of stderr). It must exit within 120 s of that: no process hangs."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + limit
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            match = STEP_LINE.search(line)
            if match and int(match.group(1)) >= at_step:
                interrupt(proc)
                break
            assert time.monotonic() < deadline, "training never reached the step"
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + rest


def strip_hidden(source: Path, target: Path) -> Path:
    """The model file as export wrote it before issue 20: no `hidden` output, nor the nodes only it used."""
    import onnx

    from export.contract import without_hidden

    onnx.save(without_hidden(onnx.load(str(source))), str(target))
    return target
