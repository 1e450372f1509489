import json
import math
import re

import pytest
import torch
from support import run_stage

from train import checkpoint
from train.data import load_corpus
from train.loop import TrainConfig, train
from train.model import CharRNN, ModelConfig


def test_seed_lesson_learns_hihell_to_ihello(hihell_run):
    ckpt = checkpoint.load(hihell_run)
    cfg = ckpt["model_config"]
    assert (cfg["cell"], cfg["num_layers"], cfg["hidden_size"], cfg["input"]) == ("rnn", 1, 5, "onehot")
    assert ckpt["train_config"]["optimizer"] == "adam" and ckpt["train_config"]["lr"] == 0.1
    assert ckpt["train_config"]["seed"] == 777 and ckpt["summary"]["epochs"] == 100
    model = CharRNN(ModelConfig(**cfg))
    model.load_state_dict(ckpt["model_state"])
    vocab = ckpt["vocab"]
    ids = torch.tensor([[vocab.index(c) for c in "hihell"]])
    with torch.no_grad():
        logits, _ = model.eval()(ids, model.init_state(1))
    assert "".join(vocab[i] for i in logits.argmax(-1)[0]) == "ihello"


def test_checkpoint_is_plain_and_complete(hihell_run):
    raw = torch.load(hihell_run / "checkpoint.pt", weights_only=True)  # no custom classes pickled
    assert raw["format"] == "charrnn-checkpoint"
    assert raw["vocab"] == ["h", "i", "e", "l", "o"]
    summary = raw["summary"]
    for key in ("steps", "chars_seen", "best_val_loss", "corpus", "seconds"):
        assert key in summary
    assert summary["corpus"] == "hihell" and summary["steps"] == 100 and summary["chars_seen"] == 600


def _train(tmp_path, corpus_path, **overrides):
    corpus = load_corpus(str(corpus_path))
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), cell="gru", num_layers=1, hidden_size=16)
    cfg = TrainConfig(out=tmp_path, batch_size=4, seq_len=16, eval_every=5, seed=3, **overrides)
    return train(corpus, model_cfg, cfg)


def test_training_is_deterministic_on_cpu(tmp_path, tiny_corpus):
    a = _train(tmp_path / "a", tiny_corpus, steps=12)
    b = _train(tmp_path / "b", tiny_corpus, steps=12)
    assert a["best_val_loss"] == b["best_val_loss"]
    wa = checkpoint.load(tmp_path / "a")["model_state"]
    wb = checkpoint.load(tmp_path / "b")["model_state"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_validation_metrics_and_best_checkpoint(tmp_path, tiny_corpus):
    summary = _train(tmp_path, tiny_corpus, steps=20)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["event"] == "val"]
    assert [r["step"] for r in vals] == [0, 5, 10, 15, 20]  # step 0: the untrained model, for reference
    assert summary["best_val_loss"] == min(r["val_loss"] for r in vals)
    for r in vals:  # both protocols at every validation, in nats and bits per character
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
        assert r["val_bpc_windowed"] == pytest.approx(r["val_loss_windowed"] / math.log(2))
        assert r["windowed_se"] <= 0.005 and r["windows"] >= 1 and r["eval_seconds"] >= 0
    best = next(r for r in vals if r["step"] == summary["best_step"])
    assert summary["best_val_loss_windowed"] == best["val_loss_windowed"]
    assert summary["best_val_bpc"] == pytest.approx(summary["best_val_loss"] / math.log(2))
    assert records[-1]["event"] == "done"
    assert any(r["event"] == "train" for r in records)
    saved = checkpoint.load(tmp_path)["summary"]
    assert saved["best_val_loss"] == summary["best_val_loss"]
    assert saved["steps"] == summary["best_step"]  # the kept weights are the best ones, not the last


def test_budgets_stop_training(tmp_path, tiny_corpus):
    assert _train(tmp_path / "s", tiny_corpus, steps=7)["steps"] == 7
    by_epoch = _train(tmp_path / "e", tiny_corpus, epochs=2)
    assert by_epoch["epochs"] == 2
    timed = _train(tmp_path / "t", tiny_corpus, time_budget=1.0, steps=10_000)
    # The budget counts training steps only (train_seconds): it ends them just past 1 s. The wall clock adds
    # start-up and evaluation, which a busy machine stretches (10.09 s once in CI's shoes), so it only
    # bounds a hang.
    assert 0 < timed["steps"] < 10_000 and 1.0 <= timed["train_seconds"] < 5 and timed["seconds"] < 60


def test_state_is_carried_across_windows_and_reset_per_epoch(tmp_path, tiny_corpus, monkeypatch):
    seen = []
    original = CharRNN.forward

    def spy(self, ids, state):
        if self.training:
            seen.append(bool(state.abs().sum() > 0))
        return original(self, ids, state)

    monkeypatch.setattr(CharRNN, "forward", spy)
    corpus = load_corpus(str(tiny_corpus))
    cfg = TrainConfig(out=tmp_path, batch_size=4, seq_len=100, val_fraction=0.1, eval_every=1000, epochs=2)
    train(corpus, ModelConfig(vocab_size=len(corpus.vocab), hidden_size=8, num_layers=1), cfg)
    per_epoch = len(seen) // 2
    assert per_epoch >= 2
    assert seen[0] is False and seen[per_epoch] is False  # zero state at each epoch start
    assert all(seen[1:per_epoch]) and all(seen[per_epoch + 1 :])  # carried within the epoch


def test_cli_errors_exit_nonzero(tmp_path):
    proc = run_stage("train", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"),
                     check=False)
    assert proc.returncode == 2 and "missing.txt" in proc.stderr
    proc = run_stage("train", "--corpus", "hihell", "--hidden", "0", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "hidden_size" in proc.stderr


def test_checkpoint_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path)
    torch.save({"weights": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a charrnn checkpoint"):
        checkpoint.load(tmp_path)


def test_a_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoints(tmp_path, tiny_corpus):
    # Adam at lr 1e30 with no clipping: the weights overflow within a few steps
    proc = run_stage("train", "--corpus", str(tiny_corpus), "--hidden", "32", "--layers", "1", "--batch-size", "4",
                     "--seq-len", "16", "--steps", "50", "--eval-every", "1000", "--lr", "1e30", "--grad-clip", "0",
                     "--schedule", "constant", "--out", str(tmp_path), check=False)
    print(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 1, proc.stderr
    found = re.search(r"train: error: step (\d+): the training loss is (nan|inf); training stopped\. Kept: "
                      rf"{re.escape(str(tmp_path / 'checkpoint.pt'))} \(best validation, step 0\), "
                      rf"{re.escape(str(tmp_path / 'last.pt'))} \(latest, step 0\)", proc.stderr)
    assert found, proc.stderr
    assert 1 <= int(found.group(1)) < 50 and "Traceback" not in proc.stderr
    for name in (checkpoint.FILENAME, checkpoint.LAST):
        weights = checkpoint.load(tmp_path, name)["model_state"]
        assert all(torch.isfinite(w).all() for w in weights.values())
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "diverged" and last["step"] == int(found.group(1))
    run_stage("export", str(tmp_path))  # what was kept still exports
