"""Run identities (issue 22): `python -m train --runs DIR` trains into DIR/<identity>, and with
`python -m export DIR/latest --repository REPO` the compose lifecycle: unchanged is a no-op, a larger
budget continues and publishes, another identity trains a run of its own and publishes."""

from __future__ import annotations

from support import run_stage

from export import repository


def _train(tiny_corpus, runs, *extra: str) -> str:
    proc = run_stage("train", "--corpus", str(tiny_corpus), "--runs", str(runs), "--resume", "auto", "--layers", "1",
                     "--hidden", "8", "--batch-size", "2", "--seq-len", "8", "--eval-every", "1", *extra)
    return proc.stdout + proc.stderr


def _export(runs, repo) -> str:
    return run_stage("export", str(runs / "latest"), "--repository", str(repo)).stdout


def test_unchanged_is_a_no_op_more_budget_continues_and_a_new_identity_trains_apart(tiny_corpus, tmp_path):
    runs, repo = tmp_path / "runs", tmp_path / "models"
    _train(tiny_corpus, runs, "--steps", "2")
    first = (runs / "latest").resolve()
    assert "published version 1" in _export(runs, repo)

    assert "nothing to do" in _train(tiny_corpus, runs, "--steps", "2")
    assert (runs / "latest").resolve() == first
    assert "nothing published" in _export(runs, repo), "unchanged identity and budget: no new version"

    _train(tiny_corpus, runs, "--steps", "4")  # a larger budget continues the same run
    assert (runs / "latest").resolve() == first
    assert "published version 2" in _export(runs, repo)

    _train(tiny_corpus, runs, "--steps", "2", "--hidden", "12")  # another identity: a folder of its own
    second = (runs / "latest").resolve()
    assert second != first and (first / "checkpoint.pt").exists(), "the earlier run is kept"
    assert "published version 3" in _export(runs, repo)

    _train(tiny_corpus, runs, "--steps", "2", "--hidden", "12", "--run-tag", "again")  # the same, from scratch
    assert (runs / "latest").resolve() not in (first, second)
    assert repository.versions(repo / "charrnn") == [1, 2, 3]
