"""Read docker-compose.yml the way docker compose does, as far as the deployment tests need.

Covers what our compose files use: `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$` interpolation,
YAML anchors and `<<` merge keys (PyYAML resolves them), profiles, and layering an override file
(`-f docker-compose.yml -f docker-compose.gpu.yml`: mappings merge key by key, anything else replaces).
Anything else in `${...}` raises, so a construct this reader does not know fails the tests loudly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from support import ROOT

COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"

# The seconds-long settings docs/deployment.md shows for a smoke run, and the compose tests run with.
# The embedded corpus, not `hihell`: two seconds of the seed lesson (lr 0.1) on a fast CPU drive its
# logits so large that export's 1e-4 check against PyTorch fails (seen in a container: 1.9e-4).
SMOKE_ENV = {"CHARRNN_CORPUS": "default", "CHARRNN_CELL": "rnn", "CHARRNN_LAYERS": "1", "CHARRNN_HIDDEN": "8",
             "CHARRNN_TIME_BUDGET": "2"}

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-)(?P<default>.*))?$", re.S)


def interpolate_str(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.match(match["braced"])
        if not braced:
            raise ValueError(f"interpolation this reader does not handle: {match.group(0)!r}")
        value = env.get(braced["name"])
        if braced["op"] == ":-" and not value:
            return braced["default"]
        if braced["op"] == "-" and value is None:
            return braced["default"]
        return value or ""

    return _VAR.sub(one, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


def load(*files: Path, env: Mapping[str, str] | None = None) -> dict:
    """The compose model after interpolation with env (default: nothing set, i.e. every default)."""
    model: dict = {}
    for path in files or (COMPOSE,):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw = {key: value for key, value in raw.items() if not key.startswith("x-")}
        model = merge(model, raw)
    return interpolate(model, env or {})


def active_services(model: dict, profiles: tuple[str, ...] = ()) -> dict[str, dict]:
    """Services that `docker compose [--profile P] up` starts: those with no profile or a named one."""
    return {name: svc for name, svc in model["services"].items()
            if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}


def depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def start_order(services: dict[str, dict]) -> list[str]:
    """Dependencies first (a topological order of depends_on), ties in file order."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        if name in path:
            raise ValueError(f"depends_on cycle: {' -> '.join(path + (name,))}")
        if name in order:
            return
        for dep in depends_on(services[name]):
            visit(dep, path + (name,))
        order.append(name)

    for name in services:
        visit(name)
    return order


def mounts(service: dict) -> list[dict]:
    """Volumes in long form: {type, source, target, read_only}."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target,
                        "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
        else:
            out.append({"read_only": False, **volume})
    return out


def environment(service: dict, env: Mapping[str, str]) -> dict[str, str]:
    """The container's environment: values as written, and `NAME:` (no value) taken from env when set."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    out = {}
    for name, value in raw.items():
        if value is None:
            if name in env:
                out[name] = env[name]
        else:
            out[name] = str(value)
    return out
