"""Fixtures for the tests that run real containers (`make test-containers`; marker `containers`).

Without a Docker engine these tests skip, saying why; under CI=true a missing engine fails them
instead, so CI can never pass by not running them.
"""

from __future__ import annotations

import os
import secrets

import pytest
from composefile import load
from containers.engine import Docker, engine_problem
from containers.images import Images, build_images

IMAGE_TAG = "ci"  # the tests' own image tag: a user's charrnn-serve:latest is left as it is


@pytest.fixture(scope="session")
def say(pytestconfig):
    """A line on the terminal now (not captured): which bases the images were built on, and timings."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[containers] {line}")
    return say


@pytest.fixture(scope="session")
def docker(tmp_path_factory) -> Docker:
    client = Docker(tmp_path_factory.mktemp("docker-config"))
    problem = engine_problem(client)
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the container tests cannot run: {problem}", pytrace=False)
        pytest.skip(f"container tests need a Docker engine: {problem}")
    return client


@pytest.fixture(scope="session")
def images(docker, say) -> Images:
    lb_default = load()["services"]["lb"]["image"]  # docker-compose.yml's default for CHARRNN_LB_IMAGE
    return build_images(docker, IMAGE_TAG, lb_default, say)


@pytest.fixture(scope="session")
def project_name() -> str:
    """A compose project of the tests' own (never `charrnn`, the user's project and volume)."""
    return f"charrnn-test-{secrets.token_hex(3)}"
