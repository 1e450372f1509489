"""What every API call (charrnn.v1.CharRNN and inference.GRPCInferenceService) goes through, as grpc.aio
server interceptors in one ordered chain (`chain`), outermost first:

    Outcome        the one wrapper around the handler: what it raised becomes a status (serve/api/status.py),
                   a call cut by shutdown ends UNAVAILABLE with the reason; runs the others' end hooks
    access_log     one log line per call
    call_metrics   charrnn_calls_total{rpc,code}, charrnn_time_to_first_char_seconds
    auth           the bearer token, when the server has one
    admission      the drain and the concurrent-call limit (serve/api/admission.py)

(Outcome.wrap and the four functions, each run as a call starts, go into an `ApiInterceptor` each).

Health and reflection pass through untouched, so orchestrators can always probe. KServe's own probes
(ServerLive, ServerReady, ModelReady) are health rpcs too: auth and admission leave them alone (a
draining server answers ready=false rather than UNAVAILABLE), the log line, metrics and Outcome do not. Only
Outcome wraps a streaming handler's messages (a generator around the handler's); the others act when the call starts
and register what they need at its end on the call's `Call` record, so a Generate stream costs one
wrapper per character whatever the chain holds.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc

from serve.api.admission import Gate
from serve.api.auth import BearerToken
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.inference import grpc_service_pb2 as inference_pb
from serve.api.status import ended_under, status_of
from serve.ops.metrics import Metrics

log = logging.getLogger(__name__)

PREFIX = "/" + pb.DESCRIPTOR.services_by_name["CharRNN"].full_name + "/"  # "/charrnn.v1.CharRNN/"
INFERENCE_PREFIX = "/" + inference_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name + "/"
PROBES = frozenset({"ServerLive", "ServerReady", "ModelReady"})  # KServe's health rpcs
AUTH_HEADER = "authorization"
SURFACE = "grpc"  # the metrics' surface label

# grpc's stubs are generic over the messages; the chain wraps every rpc's handler alike, so: Any.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


@dataclass
class Call:
    """One CharRNN call as the chain sees it; Outcome makes it and ends it."""

    rpc: str
    context: Context  # not to be touched once the call has ended
    peer: str
    started: float
    code: str = "OK"
    sent: int = 0
    first_message: float | None = None  # perf_counter at the first streamed message
    ended: bool = False
    _ends: list[Callable[[Call], None]] = field(default_factory=list)
    _firsts: list[Callable[[Call], None]] = field(default_factory=list)

    def at_end(self, hook: Callable[[Call], None]) -> None:
        """hook(call) runs when the call ends, before its status is sent; `code` is then final."""
        self._ends.append(hook)

    def at_first_message(self, hook: Callable[[Call], None]) -> None:
        self._firsts.append(hook)


_CALL: contextvars.ContextVar[Call] = contextvars.ContextVar("charrnn_call")  # each call runs in its own task


def _behaviour(handler: Handler) -> tuple[Callable[..., Any], Callable[..., Handler]]:
    """The handler's function and the constructor that makes a handler of the same kind around another."""
    found: Callable[..., Any] | None
    if handler.request_streaming and handler.response_streaming:
        found, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        found, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        found, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        found, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    assert found is not None  # grpc sets the one function that matches the handler's kind
    return found, make


def _rewrap(handler: Handler, behaviour: Callable[..., Any]) -> Handler:
    _, make = _behaviour(handler)
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


Wrap: TypeAlias = "Callable[[Handler, str], Handler]"  # (handler, rpc name) -> handler


def _rpc(method: str) -> str | None:
    """The rpc's name (the metrics' and the log line's label) if the method is one of the API's."""
    for prefix in (PREFIX, INFERENCE_PREFIX):
        if method.startswith(prefix):
            return method[len(prefix):]
    return None


class ApiInterceptor(grpc.aio.ServerInterceptor):
    """A grpc.aio server interceptor that applies `wrap` to the API services' handlers only (with
    probes=False, not to KServe's probes either)."""

    def __init__(self, wrap: Wrap, probes: bool = True) -> None:
        self._wrap = wrap
        self._probes = probes

    async def intercept_service(self, continuation: Continuation,
                                details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        rpc = _rpc(method)
        if handler is None or rpc is None or (not self._probes and rpc in PROBES):
            return handler
        return self._wrap(handler, rpc)


def at_start(start: Callable[[Call], None]) -> Wrap:
    """Wraps a handler so that start(call) runs as each call begins, its messages untouched. Only
    Outcome calls the result, so a streaming one may hand back the inner handler's iterator as it is."""
    return lambda handler, rpc: _on_start(handler, start)


def _on_start(handler: Handler, start: Callable[[Call], None]) -> Handler:
    inner, _ = _behaviour(handler)
    if handler.response_streaming:
        def streaming(request: Any, context: Context) -> Any:
            start(_CALL.get())
            return inner(request, context)
        return _rewrap(handler, streaming)

    async def unary(request: Any, context: Context) -> Any:
        start(_CALL.get())
        return await inner(request, context)
    return _rewrap(handler, unary)


class Outcome:
    """Outermost: makes each call's Call record and turns whatever the handler raised into a status.

    A call that shutdown cuts (its task cancelled with `shutdown_reason()` set) ends UNAVAILABLE with
    that reason instead of a bare CANCELLED; no traceback ever reaches a client."""

    def __init__(self, shutdown_reason: Callable[[], str | None]) -> None:
        self._shutdown_reason = shutdown_reason

    def wrap(self, handler: Handler, rpc: str) -> Handler:
        inner, _ = _behaviour(handler)
        if handler.response_streaming:
            async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
                call = self._begin(rpc, context)
                sent = 0
                try:
                    async for message in inner(request, context):
                        if not sent:
                            call.first_message = time.perf_counter()
                            for hook in call._firsts:
                                hook(call)
                        yield message
                        sent += 1
                except asyncio.CancelledError:
                    call.sent = sent
                    await self._cut(call)
                    raise
                except Exception as error:  # noqa: BLE001 - the one place errors become statuses
                    call.sent = sent
                    await self._fail(call, error)
                else:
                    call.sent = sent
                    self._finish(call)
                finally:
                    if not call.ended:  # closed while it waited to hand over a message: the client left
                        call.sent, call.code = sent, (ended_under(context) or grpc.StatusCode.CANCELLED).name
                        self._end(call)
            return _rewrap(handler, streaming)

        async def unary(request: Any, context: Context) -> Any:
            call = self._begin(rpc, context)
            try:
                response = await inner(request, context)
            except asyncio.CancelledError:
                await self._cut(call)
                raise
            except Exception as error:  # noqa: BLE001 - the one place errors become statuses
                await self._fail(call, error)
            else:
                call.sent = 1
                self._finish(call)
                return response
        return _rewrap(handler, unary)

    @staticmethod
    def _begin(rpc: str, context: Context) -> Call:
        call = Call(rpc, context, context.peer(), time.perf_counter())
        _CALL.set(call)
        return call

    @classmethod
    def _finish(cls, call: Call) -> None:
        """The handler returned; if the call had ended under it (a Predict's request stream stops when its
        deadline passes or the client cancels), that is the call's status, not OK."""
        code = ended_under(call.context)
        if code is not None:
            call.code = code.name
        cls._end(call)

    @staticmethod
    def _end(call: Call) -> None:
        call.ended = True
        for hook in call._ends:
            hook(call)

    async def _fail(self, call: Call, error: Exception) -> None:
        code, message = status_of(error)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", call.rpc, exc_info=error)
        call.code = code.name
        self._end(call)
        await call.context.abort(code, message)

    async def _cut(self, call: Call) -> None:
        """The task was cancelled: by shutdown (say why), its deadline, or because the client went away."""
        reason = self._shutdown_reason()
        if reason is None:
            call.code = (ended_under(call.context) or grpc.StatusCode.CANCELLED).name
            self._end(call)
            return
        call.code = grpc.StatusCode.UNAVAILABLE.name
        self._end(call)
        await call.context.abort(grpc.StatusCode.UNAVAILABLE, reason)


def access_log(call: Call) -> None:
    call.at_end(_log_line)


def _log_line(call: Call) -> None:
    log.info("%s peer=%s %s msgs=%d %.1fms", call.rpc, call.peer, call.code, call.sent,
             (time.perf_counter() - call.started) * 1e3)


def call_metrics(metrics: Metrics) -> Callable[[Call], None]:
    ttfc = metrics.time_to_first_char.labels(SURFACE)
    def start(call: Call) -> None:
        call.at_end(lambda c: metrics.calls.labels(c.rpc, c.code, SURFACE).inc())
        if call.rpc == "Generate":
            call.at_first_message(lambda c: ttfc.observe(time.perf_counter() - c.started))
    return start


def auth(token: str) -> Callable[[Call], None]:
    bearer = BearerToken(token)

    def start(call: Call) -> None:
        presented: str | bytes | None = None
        for key, value in call.context.invocation_metadata() or ():
            if key == AUTH_HEADER:
                presented = value
                break
        bearer.check(presented, "metadata 'authorization: Bearer <token>'")
    return start


def admission(gate: Gate) -> Callable[[Call], None]:
    def start(call: Call) -> None:
        task = gate.admit()
        call.at_end(lambda _: gate.release(task))
    return start


def chain(gate: Gate, metrics: Metrics, token: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors in their order (the first is outermost). Outcome comes first so that every
    refusal below it is logged, counted and mapped; Auth before Admission so that a call without the
    token never takes a slot."""
    everywhere: Iterable[Callable[[Call], None]] = (access_log, call_metrics(metrics))
    not_probes: Iterable[Callable[[Call], None]] = (*((auth(token),) if token else ()), admission(gate))
    outcome = Outcome(lambda: gate.abort_reason)
    return [ApiInterceptor(outcome.wrap), *(ApiInterceptor(at_start(start)) for start in everywhere),
            *(ApiInterceptor(at_start(start), probes=False) for start in not_probes)]

