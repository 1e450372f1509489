"""What a run shows: a tqdm bar under a pseudo-terminal, plain lines when stderr is a pipe, nothing with
--quiet; and the SIGINT/SIGTERM handlers (a second signal exits at once)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from support import ROOT, run_stage

from train.signals import StopRequests

ARGS = ("--layers", "1", "--hidden", "32", "--batch-size", "4", "--seq-len", "16", "--steps", "60",
        "--eval-every", "20", "--log-every", "20")
BAR = re.compile(r"100%\|[^|\n]*\| 60/60 steps \| train \d+\.\d{4} \| val \d+\.\d{4} \| [\d.]+k chars/s "
                 r"\[\d\d:\d\d<00:00\]")
LINE = re.compile(r"step 20 \| 20/60 steps \( 33%\) \| train \d+\.\d{4} \| val \d+\.\d{4} \| [\d.]+k chars/s "
                  r"\| elapsed \d\d:\d\d \| ETA \d\d:\d\d")


def _under_a_terminal(argv: list[str], timeout: float = 180) -> tuple[int, str]:
    """Run argv with stdout and stderr on a pseudo-terminal of 110x30; (exit code, everything it wrote)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 110, 0, 0))
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bar_on_a_terminal(tmp_path, tiny_corpus):
    code, output = _under_a_terminal([sys.executable, "-m", "train", "--corpus", str(tiny_corpus), *ARGS,
                                      "--out", str(tmp_path / "run")])
    assert code == 0, output
    final = BAR.findall(output)
    print(repr(output[-700:]))
    assert final, output
    assert "\r" in output  # redrawn in place
    assert "step 20: val" in output  # validations are written above the bar
    assert not LINE.search(output)  # no plain lines on a terminal


def test_lines_without_a_terminal_and_nothing_with_quiet(tmp_path, tiny_corpus):
    proc = run_stage("train", "--corpus", str(tiny_corpus), *ARGS, "--out", str(tmp_path / "lines"))
    lines = [x for x in proc.stderr.splitlines() if re.search(r"step \d+ \| ", x)]
    assert [re.search(r"step (\d+) \|", x).group(1) for x in lines] == ["20", "40", "60"]
    assert LINE.search(lines[0]), lines[0]
    assert "\r" not in proc.stderr
    quiet = run_stage("train", "--corpus", str(tiny_corpus), *ARGS, "--quiet", "--out", str(tmp_path / "quiet"))
    assert quiet.stderr == ""
    assert "trained at step 60" in quiet.stdout


def test_first_signal_asks_to_stop_and_a_second_exits_at_once():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while stops.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stops.received == signal.SIGTERM and stops.exit_code == 143
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler raises long before this ends
        assert exited.value.code == 130
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored on leaving
