"""`docker compose up` without Docker: every service's command as a local process, in dependency order.

What each container would get, each process gets: the command and environment from docker-compose.yml
after interpolation (small settings come in through the same CHARRNN_* variables a user sets), and the
volume paths mapped into a temporary folder (the named volume) or the repository (bind mounts). What a
container's network namespace would isolate is mapped too: the server's fixed container port 50051 on
0.0.0.0 becomes a free port on 127.0.0.1, and the healthcheck command is pointed at it. Then compose's
healthcheck command runs until the server is healthy, a client call succeeds, and the server stops
cleanly on SIGTERM, as on `docker compose stop`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from composefile import SMOKE_ENV, active_services, environment, load, mounts, start_order
from support import ROOT

pytestmark = pytest.mark.skipif(not (ROOT / "serve/__main__.py").exists(),
                                reason="needs the serve stage (python -m serve)")

CONTAINER_PORT = "50051"
# The knobs docs/deployment.md tells users to set; here they make training take seconds.
SMALL = {**SMOKE_ENV, "CHARRNN_TRAIN_DEVICE": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Localizer:
    """Maps container paths and the container port onto this machine."""

    def __init__(self, service: dict, volumes: Path, port: int) -> None:
        self.paths = {}
        for mount in mounts(service):
            host = volumes / mount["source"] if mount["type"] == "volume" else (ROOT / mount["source"]).resolve()
            host.mkdir(parents=True, exist_ok=True)
            self.paths[mount["target"]] = host
        self.port = port

    def __call__(self, text: str) -> str:
        for target, host in self.paths.items():
            text = re.sub(rf"(?<![\w/.]){re.escape(target)}(?=/|$)", str(host), text)
        return re.sub(rf"^(?:0\.0\.0\.0|127\.0\.0\.1|localhost):{CONTAINER_PORT}$", f"127.0.0.1:{self.port}", text)

    def command(self, argv: list[str]) -> list[str]:
        argv = [self(arg) for arg in argv]
        return [sys.executable, *argv[1:]] if argv[0] in ("python", "python3") else argv

    def env(self, service: dict, user_env: dict[str, str]) -> dict[str, str]:
        env = {name: self(value) for name, value in environment(service, user_env).items()}
        if env.get("CHARRNN_PORT") == CONTAINER_PORT:
            env["CHARRNN_PORT"] = str(self.port)
        if env.get("CHARRNN_METRICS_PORT", "-1") != "-1":
            env["CHARRNN_METRICS_PORT"] = "0"  # a free port here, not the container's fixed one
        if env.get("CHARRNN_HOST") == "0.0.0.0":
            env["CHARRNN_HOST"] = "127.0.0.1"
        return env


def base_env() -> dict[str, str]:
    """The host's environment minus CHARRNN_* (a container starts with none of the developer's)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHARRNN_")}


def wait_healthy(check: list[str], env: dict[str, str], server: subprocess.Popen, limit: float = 90) -> float:
    """Run the healthcheck command until it exits 0, as docker does; seconds it took."""
    start = time.monotonic()
    while True:
        if server.poll() is not None:
            raise AssertionError(f"server exited {server.returncode}:\n{server.stderr.read()}")
        probe = subprocess.run(check, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise AssertionError(f"never healthy: {probe.stdout}{probe.stderr}")
        time.sleep(0.5)


def test_compose_up_as_local_processes(tmp_path):
    model = load(env=SMALL)
    services = active_services(model)
    order = start_order(services)
    assert order == ["train", "export", "serve"]
    port = free_port()
    server = None
    try:
        for name in order:
            service = services[name]
            local = Localizer(service, tmp_path / "volumes", port)
            argv = local.command(service["command"])
            env = {**base_env(), **local.env(service, SMALL)}
            if name != "serve":  # the one-shot jobs must complete successfully for the next to start
                proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
                assert proc.returncode == 0, f"{name}: {argv}\n{proc.stdout}\n{proc.stderr}"
                continue
            server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            check = service["healthcheck"]["test"]
            assert check[0] == "CMD"
            wait_healthy(local.command(check[1:]), env, server)
            ready = server.stdout.readline()
            assert f"127.0.0.1:{port}" in ready, ready

        artifacts = tmp_path / "volumes" / "artifacts"
        assert sorted(p.name for p in artifacts.iterdir()) == ["models", "runs"]
        [run] = [p for p in (artifacts / "runs").iterdir() if p.name != "latest"]
        assert (artifacts / "runs" / "latest").resolve() == run.resolve()
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "last.pt", "loss.png", "metrics.jsonl"]
        assert sorted(p.name for p in (artifacts / "models" / "charrnn").iterdir()) == ["1"]
        client = subprocess.run([sys.executable, "-m", "serve.client", "info", "--target", f"127.0.0.1:{port}"],
                                cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        info = json.loads(client.stdout)
        assert (info["cell"], info["hidden_size"]) == ("rnn", 8) and info["corpus"].startswith("default"), info
        generate = subprocess.run([sys.executable, "-m", "serve.client", "generate", "--target",
                                   f"127.0.0.1:{port}", "--prompt", "hi", "--max-chars", "4", "--seed", "1"],
                                  cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
        assert generate.returncode == 0 and len(generate.stdout.rstrip("\n")) == 4, generate

        server.send_signal(signal.SIGTERM)  # `docker compose stop`
        assert server.wait(timeout=30) == 0, server.stderr.read()
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
