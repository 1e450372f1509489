"""Server settings: bad flags and CHARRNN_* values are argparse's usage error (exit 2), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import ROOT

from serve.ops.settings import parse


def usage_error(capsys, argv: list[str], environ: dict[str, str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(["--model", "m.onnx", *argv], environ)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("environ, fragment", [
    ({"CHARRNN_PORT": "abc"}, "CHARRNN_PORT: expected an integer, got 'abc'"),
    ({"CHARRNN_PORT": "70000"}, "CHARRNN_PORT: must be between 0 and 65535, got '70000'"),
    ({"CHARRNN_MAX_BATCH": "0"}, "CHARRNN_MAX_BATCH: must be >= 1, got '0'"),
    ({"CHARRNN_GRACE": "nan"}, "CHARRNN_GRACE: must be >= 0, got 'nan'"),
    ({"CHARRNN_METRICS_PORT": "65536"}, "CHARRNN_METRICS_PORT: must be between -1 and 65535"),
    ({"CHARRNN_LOG_LEVEL": "loud"}, "CHARRNN_LOG_LEVEL='loud': choose from DEBUG"),
    ({"CHARRNN_DEVICE": "gpu"}, "CHARRNN_DEVICE='gpu': choose from auto, cpu, cuda"),
])
def test_bad_environment_value_is_a_usage_error(capsys, environ, fragment):
    err = usage_error(capsys, [], environ)
    assert err.startswith("usage: python -m serve") and fragment in err


@pytest.mark.parametrize("argv, fragment", [
    (["--port", "70000"], "argument --port: must be between 0 and 65535, got '70000'"),
    (["--metrics-port", "70000"], "argument --metrics-port: must be between -1 and 65535"),
    (["--max-batch", "x"], "argument --max-batch: expected an integer, got 'x'"),
    (["--log-level", "bogus"], "argument --log-level: invalid choice: 'BOGUS'"),
])
def test_bad_flag_is_a_usage_error(capsys, argv, fragment):
    assert fragment in usage_error(capsys, argv, {})


def test_empty_variable_counts_as_unset():
    # compose passes "" for `CHARRNN_MAX_BATCH:` when .env sets nothing
    settings = parse(["--model", "m.onnx"], {"CHARRNN_MAX_BATCH": "", "CHARRNN_PORT": "", "CHARRNN_LOG_LEVEL": ""})
    assert (settings.max_batch, settings.port, settings.log_level) == (256, 0, "INFO")
    assert parse([], {"CHARRNN_MODEL": "m.onnx", "CHARRNN_STATE_KEY": ""}).state_key == ""


def test_log_level_is_case_insensitive_and_port_limits_are_inclusive():
    assert parse(["--model", "m.onnx", "--log-level", "debug"], {}).log_level == "DEBUG"
    assert parse(["--model", "m.onnx"], {"CHARRNN_LOG_LEVEL": "Warning"}).log_level == "WARNING"
    # --workers share the one metrics port (the parent serves their sum), so it may be the last one too
    edge = parse(["--model", "m.onnx", "--port", "65535", "--metrics-port", "65535", "--workers", "2"], {})
    assert (edge.port, edge.metrics_port) == (65535, 65535)


@pytest.mark.parametrize("argv, environ, fragment", [
    ([], {"CHARRNN_PORT": "abc"}, "CHARRNN_PORT"),
    ([], {"CHARRNN_MAX_BATCH": "0"}, "CHARRNN_MAX_BATCH"),
    (["--log-level", "bogus"], {}, "--log-level"),
    (["--port", "70000"], {}, "--port"),
])
def test_python_m_serve_exits_2_without_a_traceback(argv, environ, fragment):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARRNN_")}
    proc = subprocess.run([sys.executable, "-m", "serve", "--model", "missing.onnx", *argv], cwd=ROOT,
                          env={**env, **environ}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and fragment in proc.stderr


def test_prompt_cache_size_from_flag_or_environment():
    assert parse(["--model", "m.onnx"], {}).prompt_cache_mb == 64
    assert parse(["--model", "m.onnx"], {"CHARRNN_PROMPT_CACHE_MB": "0"}).prompt_cache_mb == 0  # off
    assert parse(["--model", "m.onnx", "--prompt-cache-mb", "8"], {"CHARRNN_PROMPT_CACHE_MB": "0"}).prompt_cache_mb == 8


def test_a_negative_prompt_cache_is_a_usage_error(capsys):
    assert "argument --prompt-cache-mb: must be >= 0, got '-1'" in usage_error(capsys, ["--prompt-cache-mb", "-1"], {})
