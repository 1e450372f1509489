"""The model repository (export/repository.py) and `python -m export --repository` (issue 22)."""

from __future__ import annotations

import json

import pytest
from support import run_stage

from export import repository


def test_publish_numbers_versions_and_skips_the_same_bytes(tmp_path):
    folder = tmp_path / "charrnn"
    assert repository.publish(folder, b"a", {"run": "r1"}).version == 1
    assert repository.publish(folder, b"a", {"run": "r1"}).version is None, "the newest holds these bytes"
    assert repository.publish(folder, b"b", {"run": "r2"}).version == 2
    assert repository.versions(folder) == [1, 2]
    assert (folder / "2" / "model.onnx").read_bytes() == b"b"
    record = json.loads((folder / "2" / "version.json").read_text())
    assert record["run"] == "r2" and record["version"] == 2 and len(record["sha256"]) == 64
    assert not [p for p in folder.iterdir() if p.name.startswith(".publishing-")], "no staging folder left"


def test_keep_removes_the_oldest_never_the_newest(tmp_path):
    folder = tmp_path / "charrnn"
    for data in (b"1", b"2", b"3"):
        repository.publish(folder, data, {})
    assert repository.publish(folder, b"4", {}, keep=2).removed == (1, 2)
    assert repository.versions(folder) == [3, 4]
    assert repository.publish(folder, b"5", {}, keep=1).removed == (3, 4)
    assert repository.versions(folder) == [5]


def test_rollback_moves_the_newest_aside_restorably_and_numbers_are_not_reused(tmp_path):
    folder = tmp_path / "charrnn"
    for data in (b"1", b"2"):
        repository.publish(folder, data, {})
    assert repository.rollback(folder) == (2, 1)
    assert repository.versions(folder) == [1] and repository.retired(folder) == [2]
    assert (folder / ".retired" / "2" / "model.onnx").read_bytes() == b"2"
    with pytest.raises(repository.RepositoryError):
        repository.rollback(folder)  # nothing to fall back to
    assert repository.publish(folder, b"3", {}).version == 3, "a retired number is not given again"
    repository.restore(folder, 2)
    assert repository.versions(folder) == [1, 2, 3]


def test_the_command_publishes_rolls_back_and_lists(text_runs, tmp_path):
    repo = tmp_path / "models"
    flat = tmp_path / "model.onnx"
    flat.write_bytes((text_runs["rnn"] / "model.onnx").read_bytes())
    out = run_stage("export", str(text_runs["gru"]), "--repository", str(repo), "--adopt", str(flat)).stdout
    assert "adopted" in out and "published version 2" in out
    assert not (text_runs["gru"] / "model.onnx.tmp").exists()
    assert (repo / "charrnn" / "2" / "model.onnx").read_bytes() == (text_runs["gru"] / "model.onnx").read_bytes()
    again = run_stage("export", str(text_runs["gru"]), "--repository", str(repo)).stdout
    assert "nothing published" in again and repository.versions(repo / "charrnn") == [1, 2]
    listing = run_stage("export", "--repository", str(repo), "--list", "--runs", str(text_runs["gru"].parent)).stdout
    assert "2  highest" in listing and str(text_runs["gru"]) in listing
    assert "retired version 2" in run_stage("export", "--repository", str(repo), "--rollback").stdout
    assert repository.versions(repo / "charrnn") == [1]
    assert run_stage("export", "--repository", str(repo), "--rollback", check=False).returncode == 2
