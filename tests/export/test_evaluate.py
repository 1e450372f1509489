"""python -m export.evaluate repeats, from the ONNX file alone, the validation figures training wrote into
its metadata; it never imports torch; it refuses characters the model cannot read."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT, run_stage

from export.evaluate import EvaluateError, evaluate_file


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_figures_equal_the_metadata_of_the_training_run(text_runs, tiny_corpus, cell):
    fig = evaluate_file(text_runs[cell] / "model.onnx", tiny_corpus)
    assert fig.carried == pytest.approx(float(fig.metadata["val_loss"]), abs=1e-4)
    assert fig.windowed == pytest.approx(float(fig.metadata["val_loss_windowed"]), abs=1e-4)
    whole = evaluate_file(text_runs[cell] / "model.onnx", tiny_corpus, val_fraction=None)
    assert whole.chars == len(tiny_corpus.read_text()) > fig.chars
    assert whole.carried != fig.carried


def test_cli_prints_both_protocols_without_importing_torch(text_runs, tiny_corpus):
    model = text_runs["gru"] / "model.onnx"
    code = ("import sys, runpy; sys.argv = ['export.evaluate', sys.argv[1], sys.argv[2]]\n"
            "try:\n    runpy.run_module('export.evaluate', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "assert 'torch' not in sys.modules, 'export.evaluate imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code, str(model), str(tiny_corpus)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "carried " in proc.stdout and "bits/char" in proc.stdout and "metadata val_loss_windowed" in proc.stdout


def test_characters_outside_the_vocabulary_are_refused(text_runs, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("it was the best of times \u00e9\u00e9 Q", encoding="utf-8")
    with pytest.raises(EvaluateError, match=r"outside the model's vocabulary.*'Q'.*first at offset"):
        evaluate_file(text_runs["gru"] / "model.onnx", text, val_fraction=None)
    proc = run_stage("export.evaluate", str(text_runs["gru"] / "model.onnx"), str(text), "--whole", check=False)
    assert proc.returncode == 2 and "export.evaluate: error:" in proc.stderr
