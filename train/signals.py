"""SIGINT and SIGTERM ask a run to stop cleanly: the loop finishes its step, saves last.pt and exits
128 + the signal's number (130, 143), so an orchestrator sees an interrupted run and can retry it with
--resume. A second signal exits at once, without saving."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Installs the handlers for as long as it is entered (main thread only; elsewhere it only listens)."""

    def __init__(self, repeat_grace: float = 0.0) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}  # what signal.signal returned: a handler, SIG_DFL, SIG_IGN or None
        self._repeat_grace = repeat_grace  # a repeat this soon after the first is the same request, delivered twice
        self._first_at = 0.0

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and time.monotonic() - self._first_at > self._repeat_grace:
            # os.write, not print: a handler that prints can land inside another write to stderr
            os.write(2, f"\ntrain: second {signal.Signals(signum).name}: exiting now, without saving\n".encode())
            raise SystemExit(128 + signum)
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum), time.monotonic()

    @property
    def exit_code(self) -> int:
        assert self.received is not None
        return 128 + int(self.received)
