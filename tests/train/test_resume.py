"""A real SIGINT (then a real SIGTERM) of `python -m train`, each followed by `--resume`, ends with the same
weights and the same validation losses as the run never interrupted; exit codes 130 and 143; what --resume
refuses, and a finished run resumed."""

from __future__ import annotations

import json
import re
import signal
import sys
from dataclasses import replace

import pytest
import torch
from support import interrupt_at_step, run_stage

from train import checkpoint
from train.data import load_corpus
from train.loop import RunOptions, TrainConfig, train
from train.model import ModelConfig
from train.rundir import RunDirError

STEPS = 240  # 7 epochs of the tiny corpus: resumes land mid-epoch and the state resets at epoch starts
ARGS = ("--cell", "gru", "--layers", "2", "--hidden", "96", "--batch-size", "4", "--seq-len", "16",
        "--eval-every", "25", "--save-every", "1000", "--log-every", "1", "--steps", str(STEPS))


def _train(corpus, out, *extra, check=True):
    return run_stage("train", "--corpus", str(corpus), *ARGS, "--out", str(out), *extra, timeout=240, check=check)


def _interrupt(corpus, out, sig: signal.Signals, at_step: int, *extra) -> tuple[int, str, int]:
    """Start training, send sig once a progress line reports at_step: (exit code, stderr, step it stopped at).

    With --log-every 1 and stderr a pipe the signal lands a few steps after at_step, far from the end
    (the run is slowed by nothing but the test's own reading)."""
    code, stderr = interrupt_at_step([sys.executable, "-m", "train", "--corpus", str(corpus), *ARGS, "--out",
                                      str(out), *extra], at_step, lambda proc: proc.send_signal(sig))
    stopped = checkpoint.load(out, checkpoint.LAST)["summary"]["steps"]
    return code, stderr, stopped


def _vals(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"], r["val_loss_windowed"]) for r in records if r["event"] == "val"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_sigint_and_sigterm_then_resume_equal_the_uninterrupted_run(tmp_path, tiny_corpus):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train(tiny_corpus, whole)

    code, stderr, first = _interrupt(tiny_corpus, parts, signal.SIGINT, 40)
    assert code == 130, stderr
    assert f"SIGINT: stopped after step {first}; saved {parts / 'last.pt'}" in stderr
    assert 40 <= first < STEPS - 50, first

    code, stderr, second = _interrupt(tiny_corpus, parts, signal.SIGTERM, first + 60, "--resume")
    assert code == 143, stderr
    assert f"resuming {parts / 'last.pt'} at step {first}" in stderr
    assert f"SIGTERM: stopped after step {second}" in stderr
    assert first + 60 <= second < STEPS, second

    done = _train(tiny_corpus, parts, "--resume")
    assert f"trained at step {STEPS}" in done.stdout

    for name in (checkpoint.FILENAME, checkpoint.LAST):
        a, b = checkpoint.load(whole, name), checkpoint.load(parts, name)
        diff = _max_diff(a["model_state"], b["model_state"])
        print(f"{name}: max |diff| over all weights, interrupted twice and resumed vs uninterrupted: {diff:.3g}")
        assert diff <= 1e-6
        assert a["summary"]["best_val_loss"] == b["summary"]["best_val_loss"]
        assert a["summary"]["best_val_loss_windowed"] == b["summary"]["best_val_loss_windowed"]
    a, b = checkpoint.load(whole, checkpoint.LAST)["resume"], checkpoint.load(parts, checkpoint.LAST)["resume"]
    assert torch.equal(a["state"], b["state"]) and torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert _vals(whole) == _vals(parts)  # every validation, both protocols, bit for bit

    again = _train(tiny_corpus, parts, "--resume")  # finished, same budget: nothing to do, nothing touched
    assert again.returncode == 0 and "nothing to do" in again.stderr + again.stdout
    assert _vals(parts) == _vals(whole)


def _setup(corpus_path, out, **overrides):
    corpus = load_corpus(str(corpus_path))
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), cell="gru", num_layers=1, hidden_size=8)
    return corpus, model_cfg, TrainConfig(out=out, batch_size=4, seq_len=16, eval_every=1000, seed=3, **overrides)


def test_resume_refuses_another_run_and_says_what_differs(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    corpus, model_cfg, cfg = _setup(tiny_corpus, out, steps=3)
    train(corpus, model_cfg, cfg, RunOptions(progress="quiet"))
    before = (out / "last.pt").read_bytes()
    resume = RunOptions(resume="yes", progress="quiet")
    for changed, message in ((dict(model_cfg=replace(model_cfg, hidden_size=16)),
                              "model hidden_size: 8 there, 16 here"),
                             (dict(cfg=replace(cfg, batch_size=8)), "batch_size: 4 there, 8 here"),
                             (dict(cfg=replace(cfg, lr=0.01)), "lr: 0.003 there, 0.01 here"),
                             (dict(corpus=replace(corpus, text=corpus.text.replace("wisdom", "wisdon"))),
                              "the corpus text differs (SHA-256")):
        args = {"corpus": corpus, "model_cfg": model_cfg, "cfg": cfg, **changed}
        with pytest.raises(RunDirError, match=re.escape(message)) as refused:
            train(args["corpus"], args["model_cfg"], args["cfg"], resume)
        assert "may change only the budget" in str(refused.value)
    assert (out / "last.pt").read_bytes() == before  # a refused resume writes nothing

    more = train(corpus, model_cfg, replace(cfg, steps=5), resume)  # the budget is what --resume may raise
    assert more["steps"] == 5 and more["resumed_from"] == 3

    proc = run_stage("train", "--corpus", str(tiny_corpus), "--hidden", "16", "--layers", "1", "--batch-size", "4",
                     "--seq-len", "16", "--steps", "5", "--out", str(out), "--resume", check=False)
    assert proc.returncode == 2 and "train: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_auto_starts_fresh_then_continues(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    corpus, model_cfg, cfg = _setup(tiny_corpus, out, steps=4)
    with pytest.raises(RunDirError, match="no run to resume"):
        train(corpus, model_cfg, cfg, RunOptions(resume="yes", progress="quiet"))
    auto = RunOptions(resume="auto", progress="quiet")
    first = train(corpus, model_cfg, cfg, auto)
    assert first["steps"] == 4 and first["resumed_from"] is None
    metrics = (out / "metrics.jsonl").read_text()
    second = train(corpus, model_cfg, cfg, auto)
    assert second["nothing_to_do"] and second["steps"] == 4
    assert (out / "metrics.jsonl").read_text() == metrics
    (out / "last.pt").unlink()  # a folder with a run but nothing to resume it from is not taken over
    with pytest.raises(RunDirError, match=r"no last\.pt to resume from"):
        train(corpus, model_cfg, cfg, auto)
