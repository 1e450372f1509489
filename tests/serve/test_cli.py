"""`python -m serve` and `python -m serve.client` as a user runs them, in subprocesses."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from serve.ops.settings import parse
from serve.ops.version import project_version
from support import ROOT, run_stage

READY = re.compile(r"^charrnn serving (.+) on (127\.0\.0\.1:\d+) \((\w+ExecutionProvider)\)$")


@contextmanager
def server_process(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """Starts `python -m serve`, waits for its ready line, yields (address, provider), stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline().strip() if ready else ""
        match = READY.match(line)
        assert match, f"no ready line: {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(2), match.group(3)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def client(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_stage("serve.client", *args, timeout=60, check=check)


def test_train_export_serve_client_end_to_end(tmp_path):
    """The user's path: every stage a subprocess, Predict through the reference client."""
    run_stage("train", "--corpus", "hihell", "--out", str(tmp_path))
    run_stage("export", str(tmp_path))
    with server_process("--model", str(tmp_path / "model.onnx")) as (target, provider):
        assert provider == "CPUExecutionProvider"  # auto on a machine without CUDA
        out = client("predict", "--target", target, "hihell", "--per-char").stdout
        assert [line.split(" -> ")[1][1] for line in out.splitlines()] == list("ihello")


def test_client_subcommands(hihell_model):
    with server_process("--model", str(hihell_model), "--device", "cpu") as (target, _):
        gen = client("generate", "--target", target, "--prompt", "hihell", "--max-chars", "7", "--temperature", "0")
        assert len(gen.stdout) == 8 and gen.stdout.startswith("o") and gen.stdout.endswith("\n")
        assert "FINISH_REASON_LENGTH" in gen.stderr
        stop = client("generate", "--target", target, "--prompt", "hi", "--max-chars", "50", "--seed", "1",
                      "--stop", "llo")
        assert stop.stdout.rstrip("\n").endswith("llo") and "FINISH_REASON_STOP" in stop.stderr
        first = json.loads(client("step", "--target", target, "hih").stdout)
        second = json.loads(client("step", "--target", target, "ell", "--state", first["state"], "--top-k", "2").stdout)
        assert (first["next"], second["next"]) == ("e", "o") and len(second["top"]) == 2
        info = json.loads(client("info", "--target", target).stdout)
        assert info["vocab"] == ["h", "i", "e", "l", "o"] and info["cell"] == "rnn"
        assert info["project_version"] == project_version()
        foreign = bytearray(base64.b64decode(first["state"]))
        foreign[8:40] = bytes(32)  # the model fingerprint: a state that names another model
        other = client("step", "--target", target, "h", "--state", base64.b64encode(foreign).decode(), check=False)
        assert other.returncode == 1 and other.stderr.startswith(
            f"error: FAILED_PRECONDITION: this server runs another model (sha256 {info['model_sha256'][:12]}...)")
        bad = client("generate", "--target", target, "--prompt", "hix", check=False)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "'x'" in bad.stderr


def test_settings_come_from_the_environment(hihell_model):
    env = {"CHARRNN_MODEL": str(hihell_model), "CHARRNN_DEVICE": "cpu", "CHARRNN_MAX_CHARS": "5"}
    settings = parse([], env)
    assert (settings.model, settings.device, settings.max_chars, settings.host) == (str(hihell_model), "cpu", 5,
                                                                                    "127.0.0.1")
    assert parse(["--max-chars", "7"], env).max_chars == 7  # a flag wins over the environment
    with server_process(env=env) as (target, _):
        bad = client("generate", "--target", target, "--prompt", "hi", "--max-chars", "6", check=False)
        assert "max_chars must be in 1..5" in bad.stderr


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read model file"),
    (b"this is not onnx", "not a loadable ONNX model"),
])
def test_server_refuses_a_missing_or_corrupt_model(tmp_path, content, problem):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    proc = run_stage("serve", "--model", str(path), check=False, timeout=60)
    assert proc.returncode != 0
    assert str(path) in proc.stderr and problem in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_server_refuses_a_non_conforming_model(tmp_path, hihell_model):
    import onnx
    model = onnx.load(hihell_model)
    del model.metadata_props[:]
    path = tmp_path / "stripped.onnx"
    onnx.save(model, path)
    proc = run_stage("serve", "--model", str(path), check=False, timeout=60)
    assert proc.returncode != 0 and str(path) in proc.stderr and "missing metadata" in proc.stderr


def test_serve_never_imports_torch():
    code = ("import importlib, pkgutil, sys, serve;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(serve.__path__, 'serve.')];"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    for path in Path(ROOT, "serve").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(torch|train|export)\b", path.read_text(), re.M), path


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serves_on_either_event_loop(hihell_model, loop):
    """uvloop is the default where installed; asyncio's own loop stays a working choice."""
    with server_process("--model", str(hihell_model), "--event-loop", loop) as (target, _):
        out = client("predict", "--target", target, "hihell", "--per-char").stdout
        assert [line.split(" -> ")[1][1] for line in out.splitlines()] == list("ihello")


def test_a_port_in_use_is_a_clear_error(hihell_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "serve", "--model", str(hihell_model), "--port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"cannot bind 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr
