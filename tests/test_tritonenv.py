"""tests/tritonenv.py: a missing .venv-triton skips a test on a developer's machine and fails it under CI."""

from __future__ import annotations

import pytest

import tritonenv


@pytest.fixture
def no_triton_env(monkeypatch, tmp_path):
    monkeypatch.setattr(tritonenv, "TRITON_PYTHON", tmp_path / ".venv-triton/bin/python")


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_env_fails_under_ci(no_triton_env, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="make install"):
        tritonenv.run_tritonside("descriptors.py")


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_env_skips_elsewhere(no_triton_env, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="make install"):
        tritonenv.run_tritonside("descriptors.py")


def test_a_failing_script_reports_its_output(tmp_path):
    with pytest.raises(AssertionError, match="No such file|can't open file"):
        tritonenv.run_tritonside("no-such-script.py")
