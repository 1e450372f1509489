"""Several server processes on one port (`--workers N`), gRPC's documented multiprocessing pattern.

Python serves gRPC from one core per process (the GIL), so more cores need more processes. The parent
reserves the port with SO_REUSEPORT (so port 0 still works), starts N spawned children that each load the
model and bind the same port with SO_REUSEPORT, prints one ready line once all are up, and forwards
SIGTERM/SIGINT (and SIGHUP: check the model file now, serve/ops/reload.py) to them; each child watches
the model file on its own. The kernel spreads incoming *connections* across the children; every call on a
connection stays with its process, so a Generate or Predict stream lives in one process, and Step needs no
affinity at all because its state travels with the request.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import time
from dataclasses import replace
from typing import Any

from serve.ops.settings import Settings

log = logging.getLogger(__name__)
START_TIMEOUT = 120.0  # seconds for every child to load the model and bind


@contextlib.contextmanager
def reserve_port(host: str, port: int):
    """A bound, non-listening SO_REUSEPORT socket that pins the port number while the children bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _child(settings: Settings, index: int, events: Any) -> None:
    from serve.ops.server import run  # imported here: the parent never loads onnxruntime or the model

    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
    if settings.metrics_port > 0:  # one metrics endpoint per process: worker i on PORT+i
        settings = replace(settings, metrics_port=settings.metrics_port + index)
    status = run(settings, reuse_port=True, ready=lambda s, address, provider: events.put((index, provider)))
    sys.exit(status)


def run_workers(settings: Settings) -> int:
    """Runs settings.workers children on one port until SIGTERM/SIGINT; the worst child status."""
    ctx = multiprocessing.get_context("spawn")  # no fork: onnxruntime and gRPC threads do not survive it
    events = ctx.Queue()
    with reserve_port(settings.host, settings.port) as port:
        child_settings = replace(settings, port=port, workers=1)
        children = [ctx.Process(target=_child, args=(child_settings, i, events), name=f"charrnn-worker{i}")
                    for i in range(settings.workers)]
        for child in children:
            child.start()
        stopping = False

        def forward(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True
            for child in children:
                if child.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)

        def check_model(signum: int, _frame: Any) -> None:  # every worker checks its model file now
            for child in children:
                if child.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signum)

        signal.signal(signal.SIGHUP, check_model)

        provider = _wait_ready(children, events)
        if provider is None:
            for child in children:
                if child.is_alive():
                    child.terminate()
            for child in children:
                child.join()
            return max(2, *(c.exitcode or 0 for c in children))
        print(f"charrnn serving {settings.model} on {settings.address_host}:{port} ({provider}, {settings.workers} worker "
              f"processes)", flush=True)
        while any(c.is_alive() for c in children):
            for child in children:
                child.join(timeout=0.5)
                if not child.is_alive() and not stopping:
                    log.error("%s exited with status %s; stopping the others", child.name, child.exitcode)
                    forward(signal.SIGTERM, None)
        return max(abs(c.exitcode or 0) for c in children)  # a child killed by a signal counts as failed


def _wait_ready(children: list[Any], events: Any) -> str | None:
    """The provider the children report, or None if one of them exits before all are ready."""
    ready: dict[int, str] = {}
    deadline = time.monotonic() + START_TIMEOUT
    while len(ready) < len(children):
        if any(not c.is_alive() for c in children) or time.monotonic() > deadline:
            return None
        with contextlib.suppress(queue.Empty):
            index, provider = events.get(timeout=0.2)
            ready[index] = provider
    return ready[0]
