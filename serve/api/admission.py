"""Whether a CharRNN call may start now: the shutdown drain and the concurrent-call limit.

The admission interceptor (serve/api/grpc/interceptors.py) asks the gate as every CharRNN call starts and
tells it when the call ends; health and reflection never pass through it, so orchestrators can always
probe. The gate lives on the event loop thread only (no locks). It knows the task of every call in
flight, so a shutdown can wait for them to finish and, when grace runs out, cancel them with a reason
the client is told.
"""

from __future__ import annotations

import asyncio
from typing import Any

from serve.errors import ResourceExhausted, Unavailable
from serve.ops.metrics import Metrics


class Gate:
    def __init__(self, max_streams: int, metrics: Metrics) -> None:
        self.max_streams = max_streams
        self.metrics = metrics
        self.calls: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.abort_reason: str | None = None  # set when shutdown cuts the calls still in flight
        self._idle: asyncio.Event | None = None

    def admit(self) -> asyncio.Task[Any]:
        """Registers the current call, or raises the domain error that refuses it (nothing waits)."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if len(self.calls) >= self.max_streams:
            raise ResourceExhausted(f"the server is at its limit of {self.max_streams} concurrent calls "
                                    "(--max-streams); retry later")
        task = asyncio.current_task()
        assert task is not None
        self.calls.add(task)
        self.metrics.active_streams.set(len(self.calls))
        return task

    def release(self, task: asyncio.Task[Any]) -> None:
        self.calls.discard(task)
        self.metrics.active_streams.set(len(self.calls))
        if not self.calls and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no call is in flight."""
        if not self.calls:
            return
        if self._idle is None or self._idle.is_set():
            self._idle = asyncio.Event()
        await self._idle.wait()

    def ready(self, engine_ready: bool) -> bool:
        """KServe's readiness on either binding (ServerReady, ModelReady, /v2/health/ready): the model's
        engine takes work and the server is not draining."""
        return engine_ready and not self.draining

    def abort_all(self, reason: str) -> None:
        """Cancels every call in flight; the Outcome interceptor ends each with UNAVAILABLE and this reason."""
        self.abort_reason = reason
        for task in list(self.calls):
            task.cancel()
