"""Builds the CPU images from the repository's Dockerfiles, on stand-in bases where the real ones cannot be pulled.

The Dockerfiles take their base as `ARG BASE_IMAGE` (default: the image a user gets). Where that image
is neither in the engine nor pullable (no registry reachable, as on our CI machines), a stand-in of the
same Debian release is built from Debian's own packages, the way the official Debian images are made:
`debootstrap --variant=minbase RELEASE` imported with `docker import`, then docker/standin/*.Dockerfile
add Debian's python3 (for python:*-slim-RELEASE) or nginx (for the load balancer, CHARRNN_LB_IMAGE).
Every choice is reported through `say`, so the run's output tells which base each image was built on.

torch comes from this machine's pip (`pip download torch==PIN --no-deps`, the CPU wheel pip knows),
served to the training image's build as its TORCH_INDEX on 127.0.0.1: the index's own torch brings
gigabytes of CUDA libraries. Builds use `--network host` for that reason.

Cached between runs, in CACHE (default ~/.cache/charrnn/containers, outside the checkout so a fresh
clone reuses it; CHARRNN_CONTAINER_CACHE moves it): the debootstrap root file system as a tar and the
torch wheel. The engine keeps the images and their layers; a warm run rebuilds only changed layers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from containers.engine import Docker
from support import ROOT

STANDIN = ROOT / "docker/standin"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LABEL = "org.charrnn.built-by=tests-containers"  # on every image built here, so only ours are pruned


def default_cache() -> Path:
    return Path(os.environ.get("CHARRNN_CONTAINER_CACHE") or Path.home() / ".cache/charrnn/containers")


def dockerfile_base(dockerfile: Path) -> str:
    """The default of `ARG BASE_IMAGE=...`: the base a user's build gets."""
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile.read_text(), re.M)
    assert match, f"{dockerfile}: no `ARG BASE_IMAGE=<default>`"
    return match.group(1)


def torch_pin() -> str:
    match = re.search(r"^torch==(\S+)", (ROOT / "requirements/train.txt").read_text(), re.M)
    assert match, "requirements/train.txt: no torch== pin"
    return match.group(1)


@dataclass(frozen=True)
class Images:
    """What compose is given: the tag of the project images and the load balancer's image."""

    tag: str
    lb: str


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's signature)
        pass


# The index URL is a build argument its RUN line sees, so it is part of that layer's cache key: a fixed
# port keeps torch's layer cached from one run to the next (any free port, and a rebuild, if it is taken).
INDEX_PORT = 53917


@contextmanager
def serve_folder(folder: Path, say: Callable[[str], None]) -> Iterator[str]:
    """An HTTP server for `folder` on 127.0.0.1 while the block runs: its URL."""
    handler = partial(_QuietHandler, directory=str(folder))
    try:
        httpd = ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError as error:
        say(f"127.0.0.1:{INDEX_PORT} is taken ({error.strerror}): another port, so torch's layer is rebuilt")
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class Builder:
    def __init__(self, docker: Docker, cache: Path, say: Callable[[str], None]) -> None:
        self.docker = docker
        self.cache = cache
        self.say = say
        cache.mkdir(parents=True, exist_ok=True)

    def build(self, dockerfile: Path, tag: str, context: Path = ROOT, timeout: float = 900,
              **args: str) -> None:
        start = time.monotonic()
        build_args = [f"--build-arg={name}={value}" for name, value in args.items()]
        # The classic builder: it takes --network=host as it is (BuildKit wants an entitlement for it),
        # and the torch index on 127.0.0.1 is reached only from the host's network.
        self.docker.run("build", "--network=host", f"--file={dockerfile}", f"--tag={tag}", f"--label={LABEL}",
                        *build_args, str(context), timeout=timeout, env={"DOCKER_BUILDKIT": "0"})
        # The image this tag named before, now untagged: gigabytes per code change if left.
        self.docker.run("image", "prune", "--force", f"--filter=label={LABEL}", timeout=300)
        self.say(f"built {tag} in {time.monotonic() - start:.1f} s"
                 + (f" (BASE_IMAGE={args['BASE_IMAGE']})" if "BASE_IMAGE" in args else ""))

    def usable(self, image: str) -> bool:
        """In the engine already, or pulled now."""
        if self.docker.has_image(image):
            return True
        pull = self.docker.run("pull", "--quiet", image, check=False, timeout=300)
        if pull.returncode != 0:
            self.say(f"cannot pull {image}: {(pull.stderr.strip().splitlines() or ['?'])[-1]}")
        return pull.returncode == 0

    def debian(self, release: str) -> str:
        """charrnn-standin/debian:RELEASE, from a debootstrap root file system (cached as a tar)."""
        image = f"charrnn-standin/debian:{release}"
        if self.docker.has_image(image):
            return image
        tar = self.cache / f"debian-{release}-minbase.tar"
        start = time.monotonic()
        if not tar.exists():
            if shutil.which("debootstrap") is None:
                raise AssertionError("no base image and no debootstrap to make a stand-in: "
                                     "apt-get install debootstrap (or give the engine a registry)")
            self.say(f"debootstrap --variant=minbase {release} (Debian's packages from {DEBIAN_MIRROR})")
            with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
                rootfs = Path(tmp) / "rootfs"
                subprocess.run(["debootstrap", "--variant=minbase", release, str(rootfs), DEBIAN_MIRROR],
                               check=True, capture_output=True, timeout=900)
                partial_tar = tar.with_suffix(".partial")
                subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial_tar), "."],
                               check=True, timeout=300)
                partial_tar.replace(tar)  # only a complete tar is ever reused
        self.docker.run("import", str(tar), image, timeout=300)
        self.say(f"imported {image} in {time.monotonic() - start:.1f} s ({tar})")
        return image

    def standin(self, kind: str, release: str, instead_of: str) -> str:
        """charrnn-standin/KIND:RELEASE from docker/standin/KIND.Dockerfile on the Debian stand-in."""
        image = f"charrnn-standin/{kind}:{release}"
        self.say(f"{instead_of} is not available: building stand-in {image} from Debian {release}'s packages")
        base = self.debian(release)
        with tempfile.TemporaryDirectory() as context:
            shutil.copy(CA_BUNDLE, Path(context) / CA_BUNDLE.name)  # pip in later builds needs this machine's CAs
            self.build(STANDIN / f"{kind}.Dockerfile", image, Path(context), BASE=base)
        return image

    def base(self, image: str, kind: str, release: str) -> str:
        """`image` where it can be had, else the stand-in of KIND for that Debian release."""
        return image if self.usable(image) else self.standin(kind, release, image)

    def torch_wheelhouse(self) -> Path:
        """CACHE/wheelhouse/torch/torch-PIN*.whl, a PEP 503 'simple' folder pip can use as an index."""
        pin = torch_pin()
        folder = self.cache / "wheelhouse" / "torch"
        if not list(folder.glob(f"torch-{pin}[+-]*.whl")):
            folder.mkdir(parents=True, exist_ok=True)
            self.say(f"pip download torch=={pin} --no-deps (this machine's wheel) into {folder}")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"torch=={pin}", "-d",
                            str(folder)], check=True, timeout=900)
        return folder.parent


def build_images(docker: Docker, tag: str, lb_default: str, say: Callable[[str], None],
                 cache: Path | None = None) -> Images:
    """charrnn-serve:TAG and charrnn-train:TAG from docker/, and an nginx image for the load balancer."""
    builder = Builder(docker, cache or default_cache(), say)
    serve_file, train_file = ROOT / "docker/serve.Dockerfile", ROOT / "docker/train.Dockerfile"
    python = dockerfile_base(serve_file)
    assert dockerfile_base(train_file) == python, "the train and serve images share a base"
    release = python.rsplit("-", 1)[-1]  # python:3.11.13-slim-bookworm -> bookworm
    base = builder.base(python, "python", release)
    builder.build(serve_file, f"charrnn-serve:{tag}", BASE_IMAGE=base)
    with serve_folder(builder.torch_wheelhouse(), say) as index:
        say(f"torch=={torch_pin()} from this machine's CPU wheel, served to the build at {index}")
        builder.build(train_file, f"charrnn-train:{tag}", BASE_IMAGE=base, TORCH_INDEX=index)
    lb = builder.base(lb_default, "nginx", release)
    return Images(tag=tag, lb=lb)
