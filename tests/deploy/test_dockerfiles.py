"""The Dockerfiles: hadolint-clean, pinned, non-root, layered, and the serving images free of torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
SERVING = [p for p in DOCKERFILES if p.name.startswith("serve")]
# CI's stand-ins for base images it cannot pull (tests/containers/images.py); never what a user builds.
STANDINS = sorted((ROOT / "docker/standin").glob("*.Dockerfile"))
# Packages that must never reach a serving image: the training framework and the export tooling.
TRAINING_ONLY = {"torch", "torchvision", "torchaudio", "onnx", "nvidia-cudnn-cu12"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def requirement_names(path: Path, seen: set[Path] | None = None) -> set[str]:
    """Package names a requirements file installs, following `-r` includes."""
    seen = seen if seen is not None else set()
    if path in seen:
        return set()
    seen.add(path)
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            names |= requirement_names(path.parent / line.split(None, 1)[1], seen)
        elif not line.startswith("-"):
            names.add(re.split(r"[\s=<>!~;\[]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def installed_requirements(path: Path) -> list[Path]:
    """Requirements files given to `pip install -r` in the Dockerfile's RUN lines."""
    files = []
    for word, args in instructions(path):
        if word == "RUN" and "pip install" in args:
            files += [ROOT / f for f in re.findall(r"-r\s+(\S+)", args)]
    return files


def test_there_are_the_images_compose_builds():
    assert {p.name for p in DOCKERFILES} == {"train.Dockerfile", "serve.Dockerfile", "serve-gpu.Dockerfile"}
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("path", DOCKERFILES + STANDINS, ids=lambda p: p.name)
def test_hadolint_at_warning_level(path):
    proc = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_base_non_root_and_dependencies_before_code(path):
    steps = instructions(path)
    bases = [args for word, args in steps if word == "FROM"]
    assert bases == ["${BASE_IMAGE}"], "the base is a build argument (CI builds on local stand-ins)"
    assert steps[0][0] == "ARG", "ARG BASE_IMAGE comes before FROM"
    default = steps[0][1].removeprefix("BASE_IMAGE=")
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", default), steps[0]
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    words = [word for word, _ in steps]
    install = next(i for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install" in args)
    code = [i for i, (word, args) in enumerate(steps) if word == "COPY" and not args.startswith("requirements")]
    assert code and min(code) > install, "copy code after installing dependencies (layer cache)"
    assert all(args.split()[0].startswith("requirements") for word, args in steps[:install] if word == "COPY")
    assert words.index("USER") > install


@pytest.mark.parametrize("path", SERVING, ids=lambda p: p.name)
def test_serving_images_install_no_torch_and_copy_only_serve(path):
    files = installed_requirements(path)
    assert files and all(f.name.startswith("serve") for f in files), files
    names = set().union(*(requirement_names(f) for f in files))
    assert not names & TRAINING_ONLY, names & TRAINING_ONLY
    assert {"grpcio", "grpcio-health-checking", "protobuf", "numpy"} <= names
    assert names & {"onnxruntime", "onnxruntime-gpu"}
    copied = [args.split()[:-1] for word, args in instructions(path) if word == "COPY"]
    sources = {src.rstrip("/") for srcs in copied for src in srcs}
    allowed = {"serve", "protos", "requirements/serve.txt", "requirements/serve-gpu.txt", "CHANGELOG.md"}
    assert sources <= allowed, sources
    assert "CHANGELOG.md" in sources, "serve/ops/version.py reads the project version from CHANGELOG.md"
    steps = instructions(path)
    checks = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(checks) == 1 and '"serve.healthcheck"' in checks[0]


def test_the_cpu_images_share_a_debian_base_the_stand_ins_can_replace():
    """images.py builds a stand-in of the release the base's tag names, and gives both images the same."""
    defaults = {p.name: instructions(p)[0][1] for p in DOCKERFILES}
    assert defaults["serve.Dockerfile"] == defaults["train.Dockerfile"]
    assert re.fullmatch(r"BASE_IMAGE=python:\d+\.\d+\.\d+-slim-(bullseye|bookworm|trixie)", defaults["serve.Dockerfile"])
    assert {p.name for p in STANDINS} == {"python.Dockerfile", "nginx.Dockerfile"}
    for path in STANDINS:
        assert [args for word, args in instructions(path) if word == "FROM"] == ["${BASE}"]


def test_the_serve_requirement_files_differ_only_in_onnxruntime():
    cpu = requirement_names(ROOT / "requirements/serve.txt")
    gpu = requirement_names(ROOT / "requirements/serve-gpu.txt")
    assert cpu - {"onnxruntime"} == gpu - {"onnxruntime-gpu"}
    assert "onnxruntime" not in gpu, "the two wheels provide the same module"


def test_requirement_parser_follows_includes():
    """Guard for the no-torch check itself: export.txt includes train.txt, which has torch."""
    assert {"torch", "onnx", "onnxruntime", "numpy"} <= requirement_names(ROOT / "requirements/export.txt")


def test_training_image_runs_both_one_shot_stages():
    steps = instructions(ROOT / "docker/train.Dockerfile")
    assert [f.name for f in installed_requirements(ROOT / "docker/train.Dockerfile")] == ["export.txt"]
    copied = {args.split()[0].rstrip("/") for word, args in steps if word == "COPY"}
    assert {"train", "export"} <= copied and "serve" not in copied


def test_dockerignore_keeps_the_context_small():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "allowlist: everything excluded, then what the images copy"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"requirements", "train", "export", "serve"} <= allowed and ".venv" not in allowed
