"""torchrun with 2 CPU processes (gloo, a 127.0.0.1 rendezvous on a free port): the same weights as one
process for the same global batch; its checkpoint exports and serves; a SIGINT stops both ranks at one step
and --resume under 2 processes ends where the uninterrupted run ends; what DDP refuses, in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from ddp_support import ARGS, STEPS, TOLERANCE, max_diff, weights, worker_ranks
from live import serve_model
from support import ROOT, free_port, interrupt_at_step, run_stage

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from train import checkpoint


def _torchrun(n: int, corpus, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "train",
            "--corpus", str(corpus), *ARGS, "--out", str(out), *extra]


def _run(n: int, corpus, out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(n, corpus, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("ddp2")
    proc = _run(2, tiny_corpus, out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_two_processes_train_the_same_weights_as_one(tmp_path, tiny_corpus, two_process_run):
    ddp, proc = two_process_run
    assert proc.stdout.count("trained at step") == 1  # rank 0 reports, the other rank is silent
    one = tmp_path / "one"
    run_stage("train", "--corpus", str(tiny_corpus), *ARGS, "--out", str(one), timeout=240)
    assert max_diff(weights(ddp), weights(one)) <= TOLERANCE
    a, b = checkpoint.load(ddp)["summary"], checkpoint.load(one)["summary"]
    assert a["world_size"] == 2 and b["world_size"] == 1 and a["chars_seen"] == b["chars_seen"]
    assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], abs=1e-5)
    assert a["best_val_loss_windowed"] == pytest.approx(b["best_val_loss_windowed"], abs=1e-5)
    saved = checkpoint.load(ddp, checkpoint.LAST)["resume"]
    assert saved["state"].shape == (4, 2, 32) and len(saved["rng_ranks"]) == 2  # every rank's slice and RNG


def test_with_the_regularizers_two_processes_still_train_what_one_does(tmp_path, tiny_corpus):
    """Locked and weight-drop masks come from (seed, step), drawn for the global batch: each rank applies its
    rows of what one process applies, so even with them on (and the average) the weights agree."""
    extra = ("--weight-drop", "0.3", "--locked-input", "0.2", "--locked-hidden", "0.2", "--locked-output", "0.2",
             "--ema", "0.9", "--steps", "40")
    proc = _run(2, tiny_corpus, tmp_path / "ddp", *extra)
    assert proc.returncode == 0, proc.stderr
    run_stage("train", "--corpus", str(tiny_corpus), *ARGS, "--out", str(tmp_path / "one"), *extra, timeout=240)
    ddp, one = (checkpoint.load(tmp_path / name, checkpoint.LAST) for name in ("ddp", "one"))
    assert max_diff(ddp["model_state"], one["model_state"]) <= TOLERANCE  # the averages
    assert max_diff(ddp["resume"]["weights"], one["resume"]["weights"]) <= TOLERANCE  # the training weights
    assert max_diff(ddp["model_state"], ddp["resume"]["weights"]) > 1e-3  # (which are not the average)


def test_the_ddp_checkpoint_exports_and_serves(two_process_run):
    out, _ = two_process_run
    run_stage("export", str(out))
    for live in serve_model(out / "model.onnx"):
        step = live.stub.Step(pb.StepRequest(text="it was the ", top_k=3), timeout=30)
        assert len(step.next) == 1 and step.state
        chars = list(live.stub.Generate(pb.GenerateRequest(prompt="it was", max_chars=20, seed=1), timeout=30))
        assert len(chars) == 20


def test_sigint_then_resume_under_two_processes_ends_as_the_uninterrupted_run(tmp_path, tiny_corpus,
                                                                              two_process_run):
    whole, _ = two_process_run
    parts = tmp_path / "parts"
    # torchrun forwards the SIGINT to both ranks, as Ctrl-C or kubelet would; communicate returns: no rank hangs
    _, stderr = interrupt_at_step(_torchrun(2, tiny_corpus, parts), 30, lambda proc: proc.send_signal(signal.SIGINT))
    stopped = checkpoint.load(parts, checkpoint.LAST)["summary"]["steps"]
    assert 30 <= stopped < STEPS, stderr
    resumed = _run(2, tiny_corpus, parts, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(parts, checkpoint.LAST)["summary"]["steps"] == STEPS
    assert max_diff(weights(parts), weights(whole)) <= TOLERANCE

    other_n = run_stage("train", "--corpus", str(tiny_corpus), *ARGS, "--out", str(parts), "--resume", "--steps",
                        str(STEPS + 10), check=False)
    assert other_n.returncode == 2 and "saved by 2 process(es), this run has 1" in other_n.stderr


def test_a_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path, tiny_corpus):
    proc = _run(2, tiny_corpus, tmp_path / "odd", "--batch-size", "3")
    assert proc.returncode != 0
    assert "--batch-size 3 does not divide among 2 processes" in proc.stderr
    assert not (tmp_path / "odd" / "last.pt").exists()


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    pid = worker_ranks(launcher.pid).get(rank)
    assert pid is not None, f"no worker of rank {rank} under torchrun {launcher.pid}"
    return pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads torchrun's workers from /proc")
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, tiny_corpus):
    out = tmp_path / "one-rank"
    # rank 1 only: rank 0 learns of it by the flag, and does not hang waiting for rank 1
    _, stderr = interrupt_at_step(_torchrun(2, tiny_corpus, out), 20,
                                  lambda proc: os.kill(_rank_pid(proc, 1), signal.SIGTERM))
    stopped = checkpoint.load(out, checkpoint.LAST)["summary"]["steps"]
    assert 20 <= stopped < STEPS, stderr
    assert f"SIGTERM: stopped after step {stopped}" in stderr  # rank 0 logged the step rank 1's signal ended
    assert len(checkpoint.load(out, checkpoint.LAST)["resume"]["rng_ranks"]) == 2


def test_a_time_budget_ends_both_ranks_together(tmp_path, tiny_corpus):
    proc = _run(2, tiny_corpus, tmp_path / "timed", "--time-budget", "2", "--steps", "100000")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("trained at step") == 1
    summary = checkpoint.load(tmp_path / "timed", checkpoint.LAST)["summary"]
    assert 2 <= summary["train_seconds"] < 10 and summary["steps"] < 100000
