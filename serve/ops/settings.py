"""Server settings: one frozen dataclass, from the command line or CHARRNN_* environment variables.

A command-line flag wins over the environment, which wins over the default. docker compose sets the
environment (e.g. CHARRNN_MODEL=/models/model.onnx CHARRNN_HOST=0.0.0.0 CHARRNN_PORT=50051). An empty
variable counts as unset: compose passes `CHARRNN_MAX_BATCH:` with nothing in .env as "". A bad value,
from a flag or the environment, is argparse's usage error (exit 2) naming it, never a traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from serve.ops.loops import CHOICES as LOOPS

PREFIX = "CHARRNN_"


@dataclass(frozen=True)
class Settings:
    model: str = field(default="", metadata={
        "help": "the exported .onnx file (the only thing the server reads); or give --model-repository"})
    model_repository: str = field(default="", metadata={
        "help": "a model repository written by `python -m export RUN --repository REPO`: serve the highest version "
                "REPO/NAME/N/model.onnx (NAME: --model-name) and switch when a higher one appears or the highest is "
                "rolled back (checked every --reload-interval); instead of --model"})
    model_version: int = field(default=0, metadata={
        "help": "with --model-repository: serve this version only (0 = the highest)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; containers use 0.0.0.0"})
    port: int = field(default=0, metadata={"help": "port to bind (0-65535); 0 picks a free one (printed when ready)"})
    http_port: int = field(default=0, metadata={
        "help": "HTTP port on the same host (the OpenAI-compatible API and KServe v2 REST): 0 picks a free one "
                "(printed when ready), -1 = no HTTP"})
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
    engine: str = field(default="process", metadata={
        "help": "where onnxruntime and sampling run: process (a child process, no GIL shared with gRPC) or "
                "thread (a thread of the server process)", "choices": ("process", "thread")})
    engine_hang_seconds: float = field(default=5.0, metadata={
        "help": "--engine process: an engine process that sends nothing back for this long while work waits "
                "on it is taken for hung, killed and replaced (health NOT_SERVING meanwhile); 0 = never"})
    event_loop: str = field(default="auto", metadata={
        "help": "asyncio event loop: auto (uvloop where installed, else asyncio's own), uvloop, or asyncio",
        "choices": LOOPS})
    log_level: str = field(default="INFO", metadata={
        "help": "logging level, any case (one line per RPC at INFO)", "choices": ("DEBUG", "INFO", "WARNING", "ERROR"),
        "type": str.upper})
    state_key: str = field(default="", repr=False, metadata={
        "help": "secret mixed into Step state tags so only servers sharing it accept the state; unset, anyone "
                "can mint a valid state from the public model SHA-256 (set it through the environment: a flag "
                "shows in the process list)"})
    max_streams: int = field(default=1024, metadata={
        "help": "concurrent API calls, gRPC and HTTP together (health and KServe's probes excluded); one more is "
                "refused at once with RESOURCE_EXHAUSTED (HTTP 429), never queued"})
    max_prompt_chars: int = field(default=10_000, metadata={
        "help": "upper limit on the characters of a prompt and of one Predict/Step text (INVALID_ARGUMENT above)"})
    prompt_cache_mb: int = field(default=64, metadata={
        "help": "MiB per worker process for the prompt state cache: a Generate whose prompt shares a prefix "
                "with an earlier one resumes from its state (exact: same text and logprobs); least recently "
                "used out first, emptied on a model change; 0 = off (docs/prompt-cache.md)"})
    max_message_bytes: int = field(default=1 << 20, metadata={
        "help": "largest request message gRPC accepts, and largest HTTP request body; larger ones get "
                "RESOURCE_EXHAUSTED from gRPC itself, 413 over HTTP"})
    grace: float = field(default=30.0, metadata={
        "help": "seconds that calls in flight get to finish after SIGTERM (a second SIGTERM cuts them at once)"})
    metrics_port: int = field(default=-1, metadata={
        "help": "serve Prometheus metrics on http://HOST:PORT/metrics; -1 = off, 0 = a free port (printed); "
                "with --workers N, one endpoint sums every worker"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain: serve TLS (with --tls-key)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={
        "help": "PEM CA bundle: require client certificates signed by it (mutual TLS)"})
    model_name: str = field(default="charrnn", metadata={
        "help": "the model's name on inference.GRPCInferenceService (KServe v2 / Triton clients) and in "
                "--model-repository; its version is the served version's number (1 with --model)"})
    sequence_idle_seconds: float = field(default=60.0, metadata={
        "help": "a KServe sequence (sequence_id) with no request for this long is freed; its next request "
                "without sequence_start is refused"})
    max_sequences: int = field(default=1024, metadata={
        "help": "live KServe sequences the server holds state for; a START beyond it gets RESOURCE_EXHAUSTED"})
    reload_interval: float = field(default=10.0, metadata={
        "help": "seconds between checks of the --model file (size, times, then SHA-256; polled, as inotify "
                "misses network volumes): a changed file is loaded and checked beside the served model, then "
                "serves new calls while calls in flight finish on the old one; a bad or missing file is refused "
                "(logged, counted) and the old model kept; 0 = no polling; SIGHUP checks at once either way"})
    auth_token: str = field(default="", repr=False, metadata={
        "help": "require metadata 'authorization: Bearer <token>' on every CharRNN and KServe call, and the header "
                "'Authorization: Bearer <token>' on every HTTP API call (health and KServe's probes stay open); set "
                "it through the environment: a flag shows in the process list"})

    @property
    def source(self) -> str:
        """What the server serves from, as the ready line and errors name it."""
        return self.model or f"{self.model_repository.rstrip('/')}/{self.model_name}"

    @property
    def address_host(self) -> str:
        """The host as it goes into an address: an IPv6 literal needs brackets before ':port'."""
        return f"[{self.host}]" if ":" in self.host else self.host


# Inclusive bounds; anything not named here must be >= 0. Ports stop at 65535: a larger number is not a
# port, and --port 70000 used to bind without a word.
_RANGE: dict[str, tuple[float, float | None]] = {
    "port": (0, 65535), "http_port": (-1, 65535), "metrics_port": (-1, 65535), "max_batch": (1, None),
    "max_chars": (1, None),
    "threads": (1, None), "workers": (1, None), "max_streams": (1, None), "max_prompt_chars": (1, None),
    "max_message_bytes": (1024, None), "max_sequences": (1, None),
    "sequence_idle_seconds": (0.001, None)}


def _number(name: str, kind: type[int] | type[float]) -> Any:
    low, high = _RANGE.get(name, (0, None))

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not value >= low or (high is not None and value > high):  # `not >=` also rejects NaN
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text!r}")
        return value
    convert.__name__ = name  # argparse names the type in its error message
    return convert


def parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser, with defaults from `environ` (os.environ when None); a bad variable exits 2 here."""
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve a charrnn ONNX model over gRPC and HTTP.",
                                epilog="Every flag can also be set as CHARRNN_<NAME>, e.g. CHARRNN_PORT=50051.")
    for f in fields(Settings):
        env = PREFIX + f.name.upper()
        kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} [{env}]"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if "type" in f.metadata:
            kwargs["type"] = f.metadata["type"]
        elif f.type in ("int", "float"):
            kwargs["type"] = _number(f.name, int if f.type == "int" else float)
        if environ.get(env, ""):
            kwargs["default"] = _from_environment(p, env, environ[env], kwargs.get("type", str), kwargs.get("choices"))
        else:
            kwargs["default"] = f.default
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return p


def _from_environment(p: argparse.ArgumentParser, env: str, raw: str, convert: Any,
                      choices: Sequence[str] | None) -> Any:
    """A variable's value checked as argparse checks a flag's (which skips defaults' choices)."""
    try:
        value = convert(raw)
    except argparse.ArgumentTypeError as error:
        p.error(f"{env}: {error}")  # the message quotes the value
    if choices is not None and value not in choices:
        p.error(f"{env}={raw!r}: choose from {', '.join(choices)}")
    return value


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    p = parser(environ)
    settings = Settings(**vars(p.parse_args(argv)))
    if not settings.model_name.strip():
        p.error("--model-name must not be empty: KServe clients name the model in every request")
    if bool(settings.model) == bool(settings.model_repository):
        p.error("give exactly one of --model FILE and --model-repository REPO (or CHARRNN_MODEL, "
                "CHARRNN_MODEL_REPOSITORY)")
    if settings.model_version and not settings.model_repository:
        p.error("--model-version pins a version of --model-repository")
    if settings.model_repository and "/" in settings.model_name.strip("/"):
        p.error("--model-name is a folder of --model-repository: no '/' in it")
    return settings
