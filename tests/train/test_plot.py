"""DIR/loss.png is redrawn at every validation; `python -m train.plot` compares runs on one figure."""

from __future__ import annotations

import json
import struct

from support import run_stage

from train import loop, plot
from train.data import load_corpus
from train.loop import RunOptions, TrainConfig, train
from train.model import ModelConfig

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def _train(out, corpus_path, hidden):
    corpus = load_corpus(str(corpus_path))
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), num_layers=1, hidden_size=hidden)
    cfg = TrainConfig(out=out, batch_size=4, seq_len=16, steps=20, eval_every=5, seed=3)
    return train(corpus, model_cfg, cfg, RunOptions(progress="quiet"))


def test_loss_png_is_redrawn_at_every_validation(tmp_path, tiny_corpus, monkeypatch):
    drawn = []
    real = plot.draw

    def counting(runs, out):
        drawn.append([r["step"] for r in map(json.loads, (runs[0] / "metrics.jsonl").read_text().splitlines())
                      if r["event"] == "val"][-1:])
        return real(runs, out)

    monkeypatch.setattr(loop.plot, "draw", counting)
    _train(tmp_path, tiny_corpus, 16)
    assert drawn[:5] == [[0], [5], [10], [15], [20]]  # after each validation's record, then once at the end
    assert _png_size(tmp_path / "loss.png") == (900, 550)


def test_plot_cli_compares_runs(tmp_path, tiny_corpus):
    for name, hidden in (("small", 8), ("large", 32)):
        _train(tmp_path / name, tiny_corpus, hidden)
    out = tmp_path / "compare.png"
    proc = run_stage("train.plot", str(tmp_path / "small"), str(tmp_path / "large"), "-o", str(out))
    assert proc.stdout.strip() == f"wrote {out}"
    assert _png_size(out) == (900, 550)
    missing = run_stage("train.plot", str(tmp_path / "nothing-here"), "-o", str(out), check=False)
    assert missing.returncode == 2 and "no metrics" in missing.stderr and "Traceback" not in missing.stderr
