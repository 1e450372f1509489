"""A real SIGKILL of `python -m train` in the middle of a checkpoint save leaves the previous checkpoint
loadable and exportable (train/checkpoint.py writes a temporary file, fsyncs it and renames it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from support import ROOT, run_stage

ROUNDS = 2


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    final = out / "checkpoint.pt"
    mid_save = 0
    for _ in range(ROUNDS):
        stale = set(out.glob("checkpoint.pt.*.tmp"))  # left by the previous round's kill
        # a model of a few MB saved after every step it improves: saves take long enough to be hit;
        # --resume auto: the second round continues the killed run from its last.pt
        proc = subprocess.Popen(
            [sys.executable, "-m", "train", "--corpus", str(tiny_corpus), "--out", str(out), "--cell", "gru",
             "--layers", "2", "--hidden", "256", "--batch-size", "4", "--seq-len", "16", "--eval-every", "1",
             "--steps", "100000", "--time-budget", "120", "--resume", "auto"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            before = None
            while not final.exists():  # first round: wait for one complete checkpoint
                assert proc.poll() is None and time.monotonic() < deadline, "training never saved"
            while True:  # then kill as soon as the next save has created its temporary file
                if set(out.glob("checkpoint.pt.*.tmp")) - stale:
                    # the checkpoint as it is while this save is under way: whole saves may have completed
                    # since the process started, so it is read here, not before
                    before = final.stat().st_mtime_ns
                    proc.send_signal(signal.SIGKILL)
                    break
                assert proc.poll() is None and time.monotonic() < deadline, "no further save began"
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
        if set(out.glob("checkpoint.pt.*.tmp")) - stale:
            mid_save += 1  # the kill landed before the rename: checkpoint.pt is the previous one
            if before is not None:
                assert final.stat().st_mtime_ns == before
        (out / "model.onnx").unlink(missing_ok=True)
        run_stage("export", str(out), timeout=120)
        assert (out / "model.onnx").stat().st_size > 0
    assert mid_save >= 1, "no kill landed inside a save"
