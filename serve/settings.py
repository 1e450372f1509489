"""Server settings: one frozen dataclass, from the command line or CHARRNN_* environment variables.

A command-line flag wins over the environment, which wins over the default. docker compose sets the
environment (e.g. CHARRNN_MODEL=/models/model.onnx CHARRNN_HOST=0.0.0.0 CHARRNN_PORT=50051).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

PREFIX = "CHARRNN_"


@dataclass(frozen=True)
class Settings:
    model: str = field(metadata={"help": "the exported .onnx file (the only thing the server reads)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; containers use 0.0.0.0"})
    port: int = field(default=0, metadata={"help": "port to bind; 0 picks a free one (printed when ready)"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when onnxruntime offers it, else CPU), cpu, or cuda (fail without CUDA)",
        "choices": ("auto", "cpu", "cuda")})
    max_chars: int = field(default=100_000, metadata={
        "help": "upper limit on GenerateRequest.max_chars; bounds one request's work"})
    max_batch: int = field(default=256, metadata={
        "help": "rows per onnxruntime step call; 1 = unbatched (every stream calls alone)"})
    max_delay_us: int = field(default=200, metadata={
        "help": "when idle, wait this long for concurrent requests to batch their first call"})
    workers: int = field(default=1, metadata={
        "help": "server processes sharing the port (SO_REUSEPORT); the kernel spreads connections, "
                "not calls, across them, so it helps clients that open several connections"})
    threads: int = field(default=1, metadata={
        "help": "onnxruntime intra-op threads; 1 leaves a core for gRPC on a 2-core machine"})
    log_level: str = field(default="INFO", metadata={"help": "logging level (one line per RPC at INFO)"})
    state_key: str = field(default="", repr=False, metadata={
        "help": "secret mixed into Step state tags so only servers sharing it accept the state "
                "(set it through the environment: a flag shows in the process list)"})


def _int(name: str) -> Any:
    def convert(text: str) -> int:
        value = int(text)
        if value < (1 if name in ("max_batch", "max_chars", "threads", "workers") else 0):
            raise argparse.ArgumentTypeError(f"{name} out of range: {value}")
        return value
    convert.__name__ = name  # argparse names the type in its error message
    return convert


def parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve a charrnn ONNX model over gRPC.",
                                epilog="Every flag can also be set as CHARRNN_<NAME>, e.g. CHARRNN_PORT=50051.")
    for f in fields(Settings):
        env = PREFIX + f.name.upper()
        kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} [{env}]"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type == "int":
            kwargs["type"] = _int(f.name)
        if env in environ:
            kwargs["default"] = kwargs.get("type", str)(environ[env])
        elif f.name == "model":
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return p


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    return Settings(**vars(parser(environ).parse_args(argv)))
