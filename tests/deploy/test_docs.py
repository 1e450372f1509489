"""docs/deployment.md shows the commands and settings the deployment tests exercise."""

from __future__ import annotations

import re
import shlex
from dataclasses import fields

from composefile import SMOKE_ENV
from support import ROOT

DOC = ROOT / "docs/deployment.md"


def commands() -> list[list[str]]:
    return [shlex.split(line) for line in DOC.read_text().splitlines() if line.startswith("    ")]


def test_documents_the_compose_commands():
    text = DOC.read_text()
    for command in ("docker compose up", "docker compose --profile scale up",
                    "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up",
                    "python -m serve.client info --target localhost:50051",
                    "python -m serve.healthcheck --target localhost:50051",
                    "CHARRNN_CORPUS=/corpus/mine.txt docker compose up"):
        assert command in text, command


def test_smoke_run_is_the_one_the_compose_test_runs():
    smoke = [c for c in commands() if c and c[0] == f"CHARRNN_CORPUS={SMOKE_ENV['CHARRNN_CORPUS']}"]
    assert len(smoke) == 1
    env = dict(word.split("=", 1) for word in smoke[0] if re.match(r"CHARRNN_\w+=", word))
    assert env == SMOKE_ENV
    assert smoke[0][len(env):] == ["docker", "compose", "up"]


def test_every_variable_named_exists():
    from serve.ops.settings import PREFIX, Settings

    known = {PREFIX + f.name.upper() for f in fields(Settings)}
    compose = (ROOT / "docker-compose.yml").read_text() + (ROOT / "docker-compose.gpu.yml").read_text()
    compose += (ROOT / "tests/containers/images.py").read_text()  # the container tests' cache folder
    compose += "".join(p.read_text() for p in (ROOT / "deploy/kubernetes").rglob("*.yaml"))
    for name in set(re.findall(r"CHARRNN_[A-Z_]+", DOC.read_text())):
        assert name in compose or name in known, name


def test_documents_the_kubernetes_commands_and_objects():
    text = DOC.read_text()
    for command in ("kubectl apply -k deploy/kubernetes/base", "kubectl kustomize deploy/kubernetes/base",
                    "kubectl -n charrnn rollout restart deployment/charrnn-serve",
                    "kubectl -n charrnn create secret generic charrnn"):
        assert command in text, command
    for overlay in (ROOT / "deploy/kubernetes/overlays").iterdir():
        assert f"overlays/{overlay.name}" in text, overlay.name
    for key in ("auth-token", "state-key"):  # the Secret's keys the Deployment reads
        assert key in text and key in (ROOT / "deploy/kubernetes/base/serve-deployment.yaml").read_text()


def test_documents_the_rollout_the_container_tests_run():
    text = DOC.read_text()
    tests = (ROOT / "tests/containers/test_compose_up.py").read_text()
    assert "docker compose up train export" in text and '"up", "--no-build", "train", "export"' in tests
    assert "CHARRNN_RELOAD_INTERVAL" in text and "no restart" in tests.lower()
    assert "--profile scale up -d --no-deps serve-replica lb" in text and '"--no-deps", "serve-replica", "lb"' in tests


def test_ports_match_compose():
    text = DOC.read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "localhost:50051" in text and "${CHARRNN_HOST_PORT:-50051}:50051" in compose
    assert "localhost:50052" in text and "${CHARRNN_LB_PORT:-50052}:50051" in compose
