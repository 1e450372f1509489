"""A folder that holds a run is not trained over by accident; --overwrite replaces the trainer's files
(never model.onnx) so that nothing of the old run survives into the new one's export."""

from __future__ import annotations

import json

from support import run_stage

from train import checkpoint


def _train(corpus, out, *extra, check=True):
    return run_stage("train", "--corpus", str(corpus), "--layers", "1", "--batch-size", "4", "--seq-len", "16",
                     "--eval-every", "1000", "--out", str(out), *extra, check=check)


def test_used_folder_is_refused_and_overwrite_replaces_only_the_trainers_files(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    _train(tiny_corpus, out, "--hidden", "16", "--steps", "3")
    served = b"stands for the model.onnx a running server is reading"
    (out / "model.onnx").write_bytes(served)
    (out / "checkpoint.pt.abc123.tmp").write_bytes(b"left by a killed save")
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "last.pt", "metrics.jsonl")}

    refused = _train(tiny_corpus, out, "--hidden", "8", "--steps", "2", check=False)
    print(refused.stderr.strip().splitlines()[-1])
    assert refused.returncode == 2
    assert (f"train: error: {out} already holds a run (checkpoint.pt, last.pt, metrics.jsonl, loss.png); pass "
            "--resume to continue it, or --overwrite to replace it") in refused.stderr
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing touched

    both = _train(tiny_corpus, out, "--hidden", "8", "--steps", "2", "--overwrite", "--resume", check=False)
    assert both.returncode == 2 and "contradict" in both.stderr

    replaced = _train(tiny_corpus, out, "--hidden", "8", "--steps", "2", "--overwrite")
    line = next(x for x in replaced.stderr.splitlines() if "--overwrite" in x)
    print(line)
    assert "--overwrite: removed checkpoint.pt, last.pt, metrics.jsonl, loss.png from" in line
    assert (out / "model.onnx").read_bytes() == served
    assert not list(out.glob("*.tmp"))
    for name in (checkpoint.FILENAME, checkpoint.LAST):
        assert checkpoint.load(out, name)["model_config"]["hidden_size"] == 8  # the new run's, not the old
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "val"] == [0, 2]  # the old run's records are gone
