"""Prometheus metrics, one private registry per server, served as text on --metrics-port.

    curl -s http://127.0.0.1:9100/metrics | grep ^charrnn_

The engine counts once per onnxruntime step call (batch size, step time, characters), never once per
character per stream: the step loop is the hot path. Calls are counted once each, when they end.

With `--workers N` every worker counts into files of its own in one folder (prometheus_client's
multiprocess mode, chosen by PROMETHEUS_MULTIPROC_DIR before the workers start) and the parent serves
their sum on the one --metrics-port (`SharedEndpoint`): the same series, summed over the workers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when a process creates its first metric

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_STEP_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3)
_TTFC_BUCKETS = (1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0)


class Metrics:
    """Every charrnn_* metric of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_streams = Gauge("charrnn_active_streams",
                                    "CharRNN calls in flight (what --max-streams limits)", registry=r,
                                    multiprocess_mode="livesum")  # workers: the sum over those alive
        # surface: grpc or http; code: the gRPC status code's name on both (serve/api/status.py maps each
        # refusal to one code and one HTTP status), so one query counts a kind of refusal on both transports.
        self.calls = Counter("charrnn_calls", "finished API calls by rpc (or HTTP route), status code and surface",
                             ["rpc", "code", "surface"], registry=r)
        self.characters = Counter("charrnn_characters_generated", "characters sampled for Generate streams",
                                  registry=r)
        self.cancelled_streams = Counter(
            "charrnn_cancelled_streams",
            "Generate streams the engine dropped before their end (client cancelled, deadline passed, or "
            "cut at shutdown): no more steps are computed for them", registry=r)
        self.batch_size = Histogram("charrnn_batch_size", "rows per onnxruntime step call",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("charrnn_step_seconds", "seconds per onnxruntime step call",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.time_to_first_char = Histogram("charrnn_time_to_first_char_seconds",
                                            "Generate and streamed completions: seconds from the call's start "
                                            "to its first character", ["surface"], buckets=_TTFC_BUCKETS, registry=r)
        # The prompt cache (serve/engine/prompt_cache.py), counted once per admission of new streams.
        self.prompt_cache_hits = Counter(
            "charrnn_prompt_cache_hits", "Generate prompts that resumed from a cached prefix", registry=r)
        self.prompt_cache_misses = Counter(
            "charrnn_prompt_cache_misses", "Generate prompts that found no cached prefix (fed from the start)",
            registry=r)
        self.prompt_cache_saved = Counter(
            "charrnn_prompt_cache_saved_characters",
            "prompt characters not fed to the model: resumed from the cache, or shared with a concurrent "
            "prompt with the same prefix", registry=r)
        self.prompt_cache_evictions = Counter(
            "charrnn_prompt_cache_evictions", "cached prefixes dropped to stay within --prompt-cache-mb",
            registry=r)
        self.prompt_cache_bytes = Gauge(
            "charrnn_prompt_cache_bytes", "bytes the prompt cache holds (states, logits and their overhead)",
            registry=r, multiprocess_mode="livesum")  # workers: the sum over those alive
        # A fleet's model rollout in one query: `count by (sha256) (charrnn_model_info)` is 1 row when every
        # replica serves one model (serve/ops/reload.py keeps the gauge on the model served now).
        self.model_info = Gauge("charrnn_model_info", "1 for the model this server serves, by its file's SHA-256 "
                                "and its version (--model-repository's number; 1 for --model)",
                                ["sha256", "version"], registry=r, multiprocess_mode="liveall")  # workers: one row each
        self.model_reloads = Counter(
            "charrnn_model_reloads", "changed model files: ok (now served) or refused (bad, missing or failing "
            "its check; the model before it is still served)", ["result"], registry=r)
        for result in ("ok", "refused"):
            self.model_reloads.labels(result)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics on host:port in a daemon thread; returns the bound port (port 0 picks one)."""
        self._http, self._thread = _serve(self.registry, host, port)
        return int(self._http.server_address[1])

    def close(self) -> None:
        _close(self._http)
        self._http = None


def _serve(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    return start_http_server(port, addr=host, registry=registry)


def _close(http: WSGIServer | None) -> None:
    if http is not None:
        http.shutdown()
        http.server_close()


class SharedEndpoint:
    """The parent's /metrics for `--workers`: every worker's files in `folder`, summed when scraped."""

    def __init__(self, folder: str, host: str, port: int) -> None:
        self.folder = folder
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        self._http, _ = _serve(registry, host, port)
        self.port = int(self._http.server_address[1])

    def process_exited(self, pid: int) -> None:
        """Drops the live gauges of a worker that has exited (its counters still count)."""
        multiprocess.mark_process_dead(pid, self.folder)

    def close(self) -> None:
        _close(self._http)


@contextlib.contextmanager
def shared_endpoint(host: str, port: int) -> Iterator[SharedEndpoint]:
    """A fresh folder named in PROMETHEUS_MULTIPROC_DIR for the workers started inside the block (they
    inherit the environment), its endpoint served on host:port; both gone after the block."""
    folder = tempfile.mkdtemp(prefix="charrnn-metrics-")
    os.environ[MULTIPROC_DIR] = folder
    try:
        endpoint = SharedEndpoint(folder, host, port)
        try:
            yield endpoint
        finally:
            endpoint.close()
    finally:
        del os.environ[MULTIPROC_DIR]
        shutil.rmtree(folder, ignore_errors=True)
