"""--dtype, --compile, --tf32 on a machine without a GPU: bfloat16 trains through CPU autocast (and is part of
what --resume checks), --compile is refused on the CPU, and train.gpu_check runs its whole path in --dry-run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from support import run_stage

from train import checkpoint
from train.data import load_corpus
from train.loop import RunOptions, TrainConfig, train
from train.model import ModelConfig
from train.rundir import RunDirError


def _setup(tiny_corpus, tmp_path):
    corpus = load_corpus(str(tiny_corpus))
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), cell="gru", num_layers=1, hidden_size=16)
    cfg = TrainConfig(out=tmp_path / "f32", batch_size=4, seq_len=16, steps=12, eval_every=6, device="cpu")
    return corpus, model_cfg, cfg


def test_bfloat16_trains_on_the_cpu_and_resume_keeps_the_dtype(tiny_corpus, tmp_path):
    corpus, model_cfg, cfg = _setup(tiny_corpus, tmp_path)
    quiet = RunOptions(progress="quiet")
    train(corpus, model_cfg, cfg, quiet)
    bf16 = replace(cfg, out=tmp_path / "bf16", dtype="bfloat16")
    summary = train(corpus, model_cfg, bf16, quiet)
    a = checkpoint.load(cfg.out, checkpoint.LAST)["model_state"]
    b = checkpoint.load(bf16.out, checkpoint.LAST)["model_state"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < diff < 0.05  # autocast changed the arithmetic, not the training
    assert all(v.dtype == torch.float32 for v in b.values())
    assert checkpoint.load(bf16.out, checkpoint.LAST)["resume"]["state"].dtype == torch.float32
    assert summary["best_val_loss"] == pytest.approx(checkpoint.load(cfg.out)["summary"]["best_val_loss"], abs=0.05)
    with pytest.raises(RunDirError, match="dtype: 'bfloat16' there, 'float32' here"):
        train(corpus, model_cfg, replace(bf16, dtype="float32", steps=20), RunOptions(resume="yes", progress="quiet"))


def test_a_last_pt_from_before_the_dtype_option_resumes_as_float32(tiny_corpus, tmp_path):
    corpus, model_cfg, cfg = _setup(tiny_corpus, tmp_path)
    train(corpus, model_cfg, cfg, RunOptions(progress="quiet"))
    saved = checkpoint.load(cfg.out, checkpoint.LAST)
    del saved["train_config"]["dtype"], saved["train_config"]["compile"], saved["train_config"]["tf32"]
    checkpoint.save(cfg.out / checkpoint.LAST, {k: v for k, v in saved.items() if k not in ("format", "version")})
    assert train(corpus, model_cfg, replace(cfg, steps=14), RunOptions(resume="yes", progress="quiet"))["steps"] == 14


def test_bad_speed_flags_are_refused_in_one_line(tiny_corpus, tmp_path):
    proc = run_stage("train", "--corpus", str(tiny_corpus), "--compile", "--device", "cpu", "--out",
                     str(tmp_path / "c"), check=False)
    assert proc.returncode == 2 and "--compile is supported on CUDA only" in proc.stderr
    assert not (tmp_path / "c" / "last.pt").exists()
    proc = run_stage("train", "--corpus", str(tiny_corpus), "--dtype", "float16", "--out", str(tmp_path / "d"),
                     check=False)
    assert proc.returncode == 2 and "invalid choice: 'float16'" in proc.stderr
    with pytest.raises(ValueError, match="dtype must be one of"):
        TrainConfig(out=tmp_path, dtype="half")


def test_gpu_check_dry_run_reports_speed_and_validation(tiny_corpus):
    proc = run_stage("train.gpu_check", "--dry-run", "--seconds", "2", "--corpus", str(tiny_corpus), timeout=120)
    fig = json.loads(proc.stdout.splitlines()[-1])
    assert fig["device"] == "cpu (dry run)" and fig["dtype"] == "bfloat16" and fig["steps"] > 0
    assert fig["chars_per_s"] > 0 and fig["val_loss"] > 0 and fig["val_loss_windowed"] > 0
    assert "chars/s" in proc.stdout and "validation: carried" in proc.stdout
    if not torch.cuda.is_available():
        refused = run_stage("train.gpu_check", "--seconds", "2", check=False)
        assert refused.returncode == 2 and "no CUDA device" in refused.stderr
