"""Waiting on a pipe, for both ends of the process boundary."""

from __future__ import annotations

import select


def readable(fd: int, timeout: float | None) -> bool:
    """Whether fd has something to read within timeout seconds (None: wait). poll, not select: a busy
    server has more than 1024 descriptors open, and select cannot watch those."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))
