"""bench/train.py shrunk to seconds: both loops run, the peak is measured, the figures are printed side by side."""

from __future__ import annotations

import json
import subprocess
import sys

from support import ROOT


def test_training_benchmark_prints_both_loops_and_the_peak(tiny_corpus):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--corpus", str(tiny_corpus),
                           "--hidden", "16", "--batch-size", "2", "--seq-len", "8", "--steps", "5", "--rounds", "2",
                           "--matmul", "64"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ours ") for line in lines) and any(line.startswith("plain ") for line in lines)
    assert any(line.startswith("matmul ") for line in lines) and "ours / plain:" in proc.stdout
    figures = json.loads(lines[-1])
    assert figures["ours_chars_per_s"] > 0 and figures["plain_chars_per_s"] > 0 and figures["matmul_flops"] > 0
    assert len(figures["rounds"]["ours"]) == len(figures["rounds"]["plain"]) == 2
    assert figures["ratio"] == figures["ours_chars_per_s"] / figures["plain_chars_per_s"]
    # 3 x (layer 1: 2*3*16*(64+16) + layer 2: 2*3*16*32 + head: 2*16*vocab)
    vocab = len(set(tiny_corpus.read_text()))
    assert figures["flops_per_char"] == 3 * (2 * 3 * 16 * 80 + 2 * 3 * 16 * 32 + 2 * 16 * vocab)


def test_the_grid_times_every_combination(tiny_corpus):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--corpus", str(tiny_corpus),
                           "--hidden", "16", "--steps", "3", "--rounds", "2", "--grid", "1,2", "2,4", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.splitlines()[-1])["grid"]
    assert [(r["threads"], r["batch"], r["window"]) for r in rows] == [(1, 2, 8), (1, 4, 8), (2, 2, 8), (2, 4, 8)]
    assert all(len(r["rounds"]) == 2 and r["chars_per_s"] == max(r["rounds"]) > 0 for r in rows)
    table = [line.split() for line in proc.stdout.splitlines() if line[:7].strip().isdigit()]
    assert [row[:3] for row in table] == [["1", "2", "8"], ["1", "4", "8"], ["2", "2", "8"], ["2", "4", "8"]]
