"""The one place that maps domain errors (serve/errors.py), and calls gRPC ended, to gRPC status codes and
HTTP statuses: both transports take their answer to a refused or failed call from `status_of`."""

from __future__ import annotations

from typing import Any

import grpc

from serve.errors import (
    EngineFailure,
    FailedPrecondition,
    InvalidArgument,
    ModelChanged,
    ModelError,
    NotFound,
    ResourceExhausted,
    ServeError,
    StateFromAnotherModel,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

# Checked in order (a subclass before its base): (gRPC code, HTTP status). FAILED_PRECONDITION is 400 over
# HTTP, as in Google's own mapping of the codes; a too-large body is gRPC's RESOURCE_EXHAUSTED but HTTP's 413.
_STATUS: dict[type[ServeError], tuple[grpc.StatusCode, int]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    EngineFailure: (grpc.StatusCode.UNAVAILABLE, 503),
    ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    TooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    ModelError: (grpc.StatusCode.FAILED_PRECONDITION, 400),
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    ModelChanged: (grpc.StatusCode.FAILED_PRECONDITION, 400),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, 400),
    StateFromAnotherModel: (grpc.StatusCode.FAILED_PRECONDITION, 400),
}
INTERNAL = (grpc.StatusCode.INTERNAL, 500, "internal error")


def answer_of(error: BaseException) -> tuple[grpc.StatusCode, int, str]:
    """The gRPC code, the HTTP status and the client-facing message for an exception raised by a handler;
    anything that is not a domain error is INTERNAL / 500 with a message that gives nothing away."""
    for kind, (code, http) in _STATUS.items():
        if isinstance(error, kind):
            return code, http, str(error)
    return INTERNAL


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception (see answer_of)."""
    code, _, message = answer_of(error)
    return code, message


def ended_under(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    """How gRPC ended a call under its handler: DEADLINE_EXCEEDED once its deadline has passed (gRPC then
    cancels the handler, or ends a Predict's request stream), CANCELLED when the client cancelled, None
    while the call is live."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED if context.cancelled() else None
