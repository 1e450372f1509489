"""Shared fixtures: tiny models trained once per session, on text made here (no network, no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import run_stage

TINY_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair.\n"
) * 8


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def hihell_run(tmp_path_factory) -> Path:
    """`python -m train --corpus hihell` then `python -m export`: the seed lesson's model.onnx."""
    out = tmp_path_factory.mktemp("hihell")
    run_stage("train", "--corpus", "hihell", "--out", str(out))
    run_stage("export", str(out))
    return out


@pytest.fixture(scope="session")
def text_runs(tmp_path_factory, tiny_corpus) -> dict[str, Path]:
    """One small exported model per cell type, trained a few steps on the tiny corpus."""
    runs = {}
    for cell in ("rnn", "gru", "lstm"):
        out = tmp_path_factory.mktemp(f"text-{cell}")
        run_stage("train", "--corpus", str(tiny_corpus), "--cell", cell, "--layers", "2", "--hidden", "32",
                  "--steps", "5", "--batch-size", "4", "--seq-len", "16", "--out", str(out))
        run_stage("export", str(out))
        runs[cell] = out
    return runs
