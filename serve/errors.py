"""Domain exceptions, and the one place that maps them to gRPC status codes.

Handlers raise these; `rpc` turns them into a clean status for the client (never a traceback) and
writes the one log line per RPC.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of the errors a client may see; the message is safe to show to it."""


class InvalidArgument(ServeError):
    """The request is malformed: a bad parameter, an unknown character, unusable state bytes."""


class ModelError(ServeError):
    """The model file is missing, unreadable or does not follow the ONNX contract (start-up only)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class DeviceError(ServeError):
    """The requested execution device is not available (start-up only)."""


class Unavailable(ServeError):
    """The engine is shutting down or not running."""


_STATUS: dict[type[ServeError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    ModelError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler."""
    for kind, code in _STATUS.items():
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, "internal error"


F = TypeVar("F", bound=Callable[..., Any])


def rpc(handler: F) -> F:
    """Decorates a servicer method (coroutine or async generator): maps errors, logs one line."""
    name = handler.__name__

    def finish(context: grpc.aio.ServicerContext, start: float, outcome: str, sent: int) -> None:
        log.info("%s peer=%s %s msgs=%d %.1fms", name, context.peer(), outcome, sent,
                 (time.perf_counter() - start) * 1e3)

    async def fail(context: grpc.aio.ServicerContext, error: Exception, start: float, sent: int) -> None:
        code, message = status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", name)
        finish(context, start, code.name, sent)
        await context.abort(code, message)

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, sent = time.perf_counter(), 0
            try:
                async for message in handler(self, request, context):
                    yield message
                    sent += 1
            except asyncio.CancelledError:
                finish(context, start, "CANCELLED", sent)
                raise
            except Exception as error:  # noqa: BLE001 - the one place errors become statuses
                await fail(context, error, start, sent)
            else:
                finish(context, start, "OK", sent)

        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Awaitable[Any]:
        start = time.perf_counter()
        try:
            response = await handler(self, request, context)
        except asyncio.CancelledError:
            finish(context, start, "CANCELLED", 0)
            raise
        except Exception as error:  # noqa: BLE001 - the one place errors become statuses
            await fail(context, error, start, 0)
        else:
            finish(context, start, "OK", 1)
            return response

    return unary  # type: ignore[return-value]
