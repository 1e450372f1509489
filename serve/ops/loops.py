"""Which asyncio event loop the server runs on.

uvloop (libuv) by default where it is installed: the server's loop thread does per-character work
for every stream (waking consumers, gRPC's send completions), and on the 2-core benchmark uvloop
served about 20% more characters per second at 64 streams and at 1 stream, while the model-free
transport ceiling did not change (bench/serve.py prints both; see docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from serve.errors import ConfigError

CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The loop constructor for --event-loop and its name: auto = uvloop if it imports, else asyncio."""
    if choice not in CHOICES:
        raise ConfigError(f"--event-loop {choice}: choose from {', '.join(CHOICES)}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"
