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
    max_streams: int = field(default=1024, metadata={
        "help": "concurrent CharRNN calls (health excluded); one more is refused at once with "
                "RESOURCE_EXHAUSTED, never queued"})
    max_prompt_chars: int = field(default=10_000, metadata={
        "help": "upper limit on the characters of a prompt and of one Predict/Step text (INVALID_ARGUMENT above)"})
    max_message_bytes: int = field(default=1 << 20, metadata={
        "help": "largest request message gRPC accepts; larger ones get RESOURCE_EXHAUSTED from gRPC itself"})
    grace: float = field(default=30.0, metadata={
        "help": "seconds that calls in flight get to finish after SIGTERM (a second SIGTERM cuts them at once)"})
    metrics_port: int = field(default=-1, metadata={
        "help": "serve Prometheus metrics on http://HOST:PORT/metrics; -1 = off, 0 = a free port (printed); "
                "with --workers N, worker i serves on PORT+i"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain: serve TLS (with --tls-key)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={
        "help": "PEM CA bundle: require client certificates signed by it (mutual TLS)"})
    auth_token: str = field(default="", repr=False, metadata={
        "help": "require metadata 'authorization: Bearer <token>' on every CharRNN call (health stays open); "
                "set it through the environment: a flag shows in the process list"})


_MINIMUM = {"max_batch": 1, "max_chars": 1, "threads": 1, "workers": 1, "max_streams": 1, "max_prompt_chars": 1,
            "max_message_bytes": 1024, "metrics_port": -1}


def _number(name: str, kind: type) -> Any:
    def convert(text: str) -> int | float:
        value = kind(text)
        if not value >= _MINIMUM.get(name, 0):  # also rejects NaN
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
        if f.type in ("int", "float"):
            kwargs["type"] = _number(f.name, int if f.type == "int" else float)
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
