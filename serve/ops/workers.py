"""Several server processes on one port (`--workers N`), gRPC's documented multiprocessing pattern.

Python serves gRPC from one core per process (the GIL), so more cores need more processes. The parent
reserves the port (and the HTTP port) with SO_REUSEPORT (so port 0 still works), starts N spawned children
that each load the model and bind the same ports with SO_REUSEPORT, and prints the ready lines once all are up.
The kernel spreads incoming *connections* across the children; every call on a connection stays with its process, so
a Generate or Predict stream lives in one process, and Step needs no affinity at all because its state
travels with the request.

Stopping: only the parent takes SIGINT/SIGTERM, from before the first child starts. The children start
with both blocked and then ignore them, so a terminal's Ctrl-C, which signals the whole process group,
counts once; the parent sends each signal it gets to every child as one stop request over a pipe (the
first drains, the next cuts, as for one server). A child whose parent dies sees the pipe close and drains.

SIGHUP (check the model file now, serve/ops/reload.py) goes on to every child as a signal; each child
also watches the file on its own every --reload-interval. A child ignores SIGHUP until its server
handles it (a new child loads the file as it is anyway).

Metrics (--metrics-port): the children count into one folder, the parent serves the sum (serve/ops/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from serve.ops.metrics import SharedEndpoint, shared_endpoint
from serve.ops.settings import Settings

if TYPE_CHECKING:  # for the annotation only, as _child imports the server where it runs
    from serve.ops.server import StopRequests


def http_line(settings: Settings, port: int) -> str:
    """The ready line that names the HTTP address (https with --tls-cert), after the gRPC one."""
    scheme = "https" if settings.tls_cert else "http"
    return f"charrnn http on {scheme}://{settings.address_host}:{port}"

log = logging.getLogger(__name__)
START_TIMEOUT = 120.0  # seconds for every child to load the model and bind


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """A bound, non-listening SO_REUSEPORT socket that pins the port number while the children bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_START_BLOCKED = STOP_SIGNALS | {signal.SIGHUP}  # held while a child starts: it decides what they do


def _child(settings: Settings, index: int, events: Any, requests: Connection) -> None:
    for sig in STOP_SIGNALS:  # before unblocking: one delivered while starting is dropped, not acted on
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the server's own handler (serve/ops/server.py)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _START_BLOCKED)
    from serve.ops.server import run  # imported here: the parent never loads onnxruntime or the model

    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
    status = run(settings, reuse_port=True, ready=lambda s, address, provider: events.put((index, provider)),
                 stop_requests=_from_parent(requests))
    sys.exit(status)


def _from_parent(requests: Connection) -> StopRequests:
    """The parent's stop requests, one message each; the pipe closing (the parent died) drains, unless a
    request came first."""
    def install(loop: asyncio.AbstractEventLoop, request: Callable[[], None]) -> None:
        received = 0

        def readable() -> None:
            nonlocal received
            try:
                requests.recv_bytes()
            except (EOFError, OSError):
                loop.remove_reader(requests.fileno())
                if received:
                    return
            received += 1
            request()
        loop.add_reader(requests.fileno(), readable)
    return install


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _START_BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Stop:
    """The parent's stop requests: each SIGINT/SIGTERM it gets, sent on to every child started (and
    SIGHUP, as a signal)."""

    def __init__(self) -> None:
        self.requests = 0
        self._pipes: list[Connection] = []
        self.pids: list[int] = []  # the children started, for SIGHUP

    def check_model(self, signum: int, _frame: Any) -> None:
        """SIGHUP: every child checks its model file now."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def signal(self, _signum: int, _frame: Any) -> None:
        self.request()

    def request(self) -> None:
        self.requests += 1
        for pipe in self._pipes:
            self._send(pipe)

    def add(self, pipe: Connection) -> None:
        """A new child's pipe; it gets the requests made so far too."""
        self._pipes.append(pipe)
        for _ in range(self.requests):
            self._send(pipe)

    @staticmethod
    def _send(pipe: Connection) -> None:
        with contextlib.suppress(OSError):  # that child has exited
            pipe.send_bytes(b"stop")


def run_workers(settings: Settings) -> int:
    """Runs settings.workers children on one port until SIGTERM/SIGINT; the worst child status."""
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop.signal) for sig in STOP_SIGNALS}  # before any child exists
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, stop.check_model)
    try:
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(reserve_port(settings.host, settings.port))
            http_port = -1
            if settings.http_port >= 0:
                try:
                    http_port = stack.enter_context(reserve_port(settings.host, settings.http_port))
                except OSError as error:
                    print(f"charrnn serve: --http-port {settings.http_port}: cannot bind: {error}",
                          file=sys.stderr, flush=True)
                    return 2
            endpoint = None
            if settings.metrics_port >= 0:
                try:
                    endpoint = stack.enter_context(shared_endpoint(settings.host, settings.metrics_port))
                    log.info("metrics: the workers count into %s, served summed", endpoint.folder)
                except OSError as error:
                    print(f"charrnn serve: --metrics-port {settings.metrics_port}: cannot bind: {error}",
                          file=sys.stderr, flush=True)
                    return 2
            return _supervise(replace(settings, http_port=http_port), port, stop, endpoint)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(settings: Settings, port: int, stop: _Stop, endpoint: SharedEndpoint | None) -> int:
    ctx = multiprocessing.get_context("spawn")  # no fork: onnxruntime and gRPC threads do not survive it
    events = ctx.Queue()
    child_settings = replace(settings, port=port, workers=1, metrics_port=-1)  # the parent serves metrics
    children = []
    for i in range(settings.workers):
        if stop.requests:  # stopped while starting: start no more
            break
        theirs, ours = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child, args=(child_settings, i, events, theirs), name=f"charrnn-worker{i}")
        with _stop_signals_blocked():  # inherited by the child; a signal now reaches the parent after start
            child.start()
            stop.add(ours)
            assert child.pid is not None
            stop.pids.append(child.pid)
        theirs.close()
        children.append(child)
    provider = _wait_ready(children, events, stop)
    if provider is None and not stop.requests:
        for child in children:
            if child.is_alive():
                child.kill()  # not announced ready: no client is using it
        for child in children:
            child.join()
        return max(2, *(c.exitcode or 0 for c in children))
    if provider is not None:
        print(f"charrnn serving {settings.source} on {settings.address_host}:{port} ({provider}, {settings.workers} "
              f"worker processes)", flush=True)
        if settings.http_port >= 0:
            print(http_line(settings, settings.http_port), flush=True)
        if endpoint is not None:
            print(f"charrnn metrics on http://{settings.address_host}:{endpoint.port}/metrics", flush=True)
    running = list(children)
    while running:
        for child in list(running):
            child.join(timeout=0.5)
            if child.is_alive():
                continue
            running.remove(child)
            if child.pid in stop.pids:  # reaped: its pid may be another process's soon
                stop.pids.remove(child.pid)
            if endpoint is not None and child.pid is not None:  # pid: None only before start()
                endpoint.process_exited(child.pid)
            if not stop.requests:
                log.error("%s exited with status %s; stopping the others", child.name, child.exitcode)
                with _stop_signals_blocked():
                    stop.request()
    return max((abs(c.exitcode or 0) for c in children), default=0)  # killed by a signal counts as failed


def _wait_ready(children: list[Any], events: Any, stop: _Stop) -> str | None:
    """The provider the children report, or None if one of them exits, or a stop is requested, before
    all are ready."""
    ready: dict[int, str] = {}
    deadline = time.monotonic() + START_TIMEOUT
    while len(ready) < len(children):
        if stop.requests or any(not c.is_alive() for c in children) or time.monotonic() > deadline:
            return None
        with contextlib.suppress(queue.Empty):
            index, provider = events.get(timeout=0.2)
            ready[index] = provider
    return ready.get(0)  # None when a stop came before any child started
