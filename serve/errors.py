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


class ConfigError(ServeError):
    """A setting cannot be used, e.g. an unreadable TLS file (start-up only)."""


class EngineFailure(ServeError):
    """onnxruntime failed while this request was in the batch (the details are in the server log);
    other requests are unaffected and a retry may well succeed, hence UNAVAILABLE."""


class Unavailable(ServeError):
    """The server is shutting down, or the engine is not running."""


class ResourceExhausted(ServeError):
    """The server is at its limit of concurrent calls; refused at once, never queued."""


class Unauthenticated(ServeError):
    """The call lacks the bearer token the server was started with (or carries another one)."""


_STATUS: dict[type[ServeError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    EngineFailure: grpc.StatusCode.UNAVAILABLE,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
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
    """Decorates a CharRNN servicer method (coroutine or async generator): admission, errors, one log line.

    The servicer provides `gate` (serve/api/admission.py) and `metrics` (serve/ops/metrics.py). A call the gate
    refuses ends at once with its status. A call that shutdown cuts (gate.abort_reason set, its task
    cancelled) ends with UNAVAILABLE and that reason instead of a bare CANCELLED.
    """
    name = handler.__name__
    first_char = name == "Generate"

    def finish(self: Any, context: grpc.aio.ServicerContext, start: float, outcome: str, sent: int) -> None:
        self.metrics.calls.labels(name, outcome).inc()
        log.info("%s peer=%s %s msgs=%d %.1fms", name, context.peer(), outcome, sent,
                 (time.perf_counter() - start) * 1e3)

    async def fail(self: Any, context: grpc.aio.ServicerContext, error: Exception, start: float,
                   sent: int) -> None:
        code, message = status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", name)
        finish(self, context, start, code.name, sent)
        await context.abort(code, message)

    async def cut(self: Any, context: grpc.aio.ServicerContext, start: float, sent: int) -> None:
        """The task was cancelled: by shutdown (say why) or because the client went away."""
        reason = self.gate.abort_reason
        if reason is None:
            finish(self, context, start, "CANCELLED", sent)
            return
        finish(self, context, start, grpc.StatusCode.UNAVAILABLE.name, sent)
        await context.abort(grpc.StatusCode.UNAVAILABLE, reason)

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start, sent = time.perf_counter(), 0
            try:
                task = self.gate.admit(context.invocation_metadata())
            except ServeError as error:
                await fail(self, context, error, start, sent)
                return
            try:
                async for message in handler(self, request, context):
                    if first_char and not sent:
                        self.metrics.time_to_first_char.observe(time.perf_counter() - start)
                    yield message
                    sent += 1
            except asyncio.CancelledError:
                await cut(self, context, start, sent)
                raise
            except Exception as error:  # noqa: BLE001 - the one place errors become statuses
                await fail(self, context, error, start, sent)
            else:
                finish(self, context, start, "OK", sent)
            finally:
                self.gate.release(task)

        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Awaitable[Any]:
        start = time.perf_counter()
        try:
            task = self.gate.admit(context.invocation_metadata())
        except ServeError as error:
            await fail(self, context, error, start, 0)
        try:
            response = await handler(self, request, context)
        except asyncio.CancelledError:
            await cut(self, context, start, 0)
            raise
        except Exception as error:  # noqa: BLE001 - the one place errors become statuses
            await fail(self, context, error, start, 0)
        else:
            finish(self, context, start, "OK", 1)
            return response
        finally:
            self.gate.release(task)

    return unary  # type: ignore[return-value]
