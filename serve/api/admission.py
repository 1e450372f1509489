"""Who may start a CharRNN call: the bearer token, the shutdown drain and the concurrent-call limit.

`rpc` (serve/errors.py) asks the gate before every CharRNN call and tells it when the call ends;
health and reflection never pass through it, so orchestrators can always probe. The gate lives on
the event loop thread only (no locks). It knows the task of every call in flight, so a shutdown can
wait for them to finish and, when grace runs out, cancel them with a reason the client is told.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable
from typing import Any

from serve.errors import ResourceExhausted, Unauthenticated, Unavailable
from serve.ops.metrics import Metrics

AUTH_HEADER = "authorization"


class Gate:
    def __init__(self, max_streams: int, token: str, metrics: Metrics) -> None:
        self.max_streams = max_streams
        self._expected = ("Bearer " + token).encode() if token else None
        self.metrics = metrics
        self.calls: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.abort_reason: str | None = None  # set when shutdown cuts the calls still in flight
        self._idle: asyncio.Event | None = None

    def _authenticate(self, metadata: Iterable[Any] | None) -> None:
        presented = b""
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                presented = value.encode() if isinstance(value, str) else bytes(value)
                break
        # compare_digest takes the same time wherever the first difference is
        if not hmac.compare_digest(presented, self._expected or b""):
            raise Unauthenticated("missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")

    def admit(self, metadata: Iterable[Any] | None) -> asyncio.Task[Any]:
        """Registers the current call, or raises the domain error that refuses it (nothing waits)."""
        if self._expected is not None:
            self._authenticate(metadata)
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

    def abort_all(self, reason: str) -> None:
        """Cancels every call in flight; `rpc` ends each with UNAVAILABLE and this reason."""
        self.abort_reason = reason
        for task in list(self.calls):
            task.cancel()
