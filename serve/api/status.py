"""The one place that maps domain errors (serve/errors.py), and calls gRPC ended, to gRPC status codes."""

from __future__ import annotations

from typing import Any

import grpc

from serve.errors import (
    EngineFailure,
    InvalidArgument,
    ModelChanged,
    ModelError,
    NotFound,
    ResourceExhausted,
    ServeError,
    StateFromAnotherModel,
    Unauthenticated,
    Unavailable,
)

_STATUS: dict[type[ServeError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    EngineFailure: grpc.StatusCode.UNAVAILABLE,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ModelError: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ModelChanged: grpc.StatusCode.FAILED_PRECONDITION,
    StateFromAnotherModel: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler; anything that is
    not a domain error is INTERNAL with a message that gives nothing away."""
    for kind, code in _STATUS.items():
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, "internal error"


def ended_under(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    """How gRPC ended a call under its handler: DEADLINE_EXCEEDED once its deadline has passed (gRPC then
    cancels the handler, or ends a Predict's request stream), CANCELLED when the client cancelled, None
    while the call is live."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED if context.cancelled() else None
