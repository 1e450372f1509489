"""What every HTTP API call goes through: the HTTP side of serve/api/grpc/interceptors.py, built from the
same policy objects (the Gate, the BearerToken, the Metrics) and the same status map (serve/api/status.py).

`Policies.route(rpc, handler, style)` makes the ASGI app of one route. In order, for each call:

    body         read whole, up to --max-message-bytes (413 above it, before anything else is done)
    auth         the bearer token (401), unless the route is a probe
    admission    the drain (503) and --max-streams (429, never queued), unless the route is a probe
    handler      request -> service -> response (streamed or not)
    outcome      what the handler raised becomes the surface's error body (or, once a stream has started,
                 its error event); a client that leaves cancels the call and frees its slot at once
    end          one log line, charrnn_calls_total{rpc, code, surface="http"}

Probes (KServe's health and readiness routes) stay open, like gRPC health: no token, no slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from starlette.requests import Request
from starlette.responses import Response

from serve.api.admission import Gate
from serve.api.auth import BearerToken
from serve.api.status import answer_of
from serve.errors import InvalidArgument, NotFound, TooLarge, Unavailable
from serve.ops.metrics import Metrics

log = logging.getLogger(__name__)

SURFACE = "http"  # the metrics' surface label
Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]


class ErrorStyle(Protocol):
    """How one surface (OpenAI's, KServe's) writes an error."""

    def response(self, status: int, message: str, param: str | None) -> Response:
        """The error as the whole response, when nothing has been sent yet."""

    def event(self, status: int, message: str) -> bytes:
        """The error as the last bytes of a stream already under way (server-sent events)."""


@dataclass
class HttpCall:
    """One call as the chain sees it; the handler may note its first character and what it sent."""

    rpc: str
    peer: str
    body: bytes
    started: float = field(default_factory=time.perf_counter)
    code: str = "OK"
    status: int = 200
    sent: int = 0  # messages: characters streamed, or 1 for a whole response
    first_message: float | None = None
    disconnected: bool = False  # the client went away before the response ended
    complete: bool = False  # the response's last bytes have been handed to the server
    on_first: Callable[[HttpCall], None] | None = None

    def first(self) -> None:
        """The handler hands its first character to the client now (time to first character)."""
        if self.first_message is None:
            self.first_message = time.perf_counter()
            if self.on_first is not None:
                self.on_first(self)


class Reply:
    """How a handler answers: a whole Starlette response, or a stream of body parts after `start`."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope, self._receive, self._send = scope, receive, send

    async def respond(self, response: Response) -> None:
        await response(self._scope, self._receive, self._send)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


Handler: TypeAlias = Callable[[Request, HttpCall, Reply], Awaitable[None]]


def peer_of(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


async def read_body(receive: Receive, headers: Any, limit: int) -> bytes:
    """The whole request body; TooLarge past `limit` bytes, whether announced by Content-Length or not."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidArgument(f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise TooLarge(f"the request body is {size} bytes, the limit is {limit} (--max-message-bytes)")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left while sending
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body is over {limit} bytes (--max-message-bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Policies:
    """The policy objects both transports share, and the one wrapper that applies them to HTTP routes."""

    def __init__(self, gate: Gate, metrics: Metrics, token: str, max_body: int) -> None:
        self.gate = gate
        self.metrics = metrics
        self.bearer = BearerToken(token) if token else None
        self.max_body = max_body
        self._ttfc = metrics.time_to_first_char.labels(SURFACE)

    def route(self, rpc: str, handler: Handler, style: ErrorStyle, probe: bool = False,
              streams: bool = False) -> Call:
        """The ASGI app of one route. streams: the route may stream characters (its first one is timed)."""
        return Call(self, rpc, handler, style, probe, streams)

    def observe_first(self, call: HttpCall) -> None:
        self._ttfc.observe(call.first_message - call.started if call.first_message else 0.0)

    def end(self, call: HttpCall) -> None:
        self.metrics.calls.labels(call.rpc, call.code, SURFACE).inc()
        log.info("%s peer=%s %s status=%d msgs=%d %.1fms", call.rpc, call.peer, call.code, call.status, call.sent,
                 (time.perf_counter() - call.started) * 1e3)


class Call:
    """One route's ASGI app (a class, not a function: Starlette would take a function for a request handler)."""

    def __init__(self, policies: Policies, rpc: str, handler: Handler, style: ErrorStyle, probe: bool,
                 streams: bool) -> None:
        self.policies = policies
        self.rpc = rpc
        self.handler = handler
        self.style = style
        self.probe = probe
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policies, gate = self.policies, self.policies.gate
        call = HttpCall(self.rpc, peer_of(scope), b"", on_first=policies.observe_first if self.streams else None)
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                call.status = message["status"]
            elif not message.get("more_body", False):
                call.complete = True
                if not self.streams and call.status < 400:
                    call.sent = 1  # one whole response
                end()  # counted and logged before the client can see the end, as gRPC's chain does
            await send(message)

        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                policies.end(call)

        task = asyncio.current_task()
        assert task is not None
        admitted: asyncio.Task[Any] | None = None
        watcher: asyncio.Future[None] | None = None
        request = Request(scope, receive)
        try:
            try:
                call.body = await read_body(receive, request.headers, policies.max_body)
                if not self.probe:
                    if policies.bearer is not None:
                        policies.bearer.check(request.headers.get("authorization"),
                                              "the header 'Authorization: Bearer <token>'")
                    admitted = gate.admit()
                watcher = asyncio.ensure_future(_watch_disconnect(receive, call, task))
                await self.handler(request, call, Reply(scope, receive, sending))
            except asyncio.CancelledError:
                if call.disconnected:  # the client left: nothing to answer, the slot is freed below
                    task.uncancel()
                    call.code = "CANCELLED"
                    return
                reason = gate.abort_reason
                if reason is None:
                    raise
                task.uncancel()  # cut by shutdown: say so, as gRPC's UNAVAILABLE does
                raise Unavailable(reason) from None
        except asyncio.CancelledError:
            call.code = "CANCELLED"
            raise
        except Exception as error:  # the one place HTTP errors become responses
            code, status, message = answer_of(error)
            if status == 500:
                log.error("%s failed", self.rpc, exc_info=error)
            call.code = code.name
            with contextlib.suppress(OSError):
                if not started:
                    param = error.param if isinstance(error, InvalidArgument | NotFound) else None
                    await self.style.response(status, message, param)(scope, receive, sending)
                else:  # a stream under way: its last event says what happened
                    await sending({"type": "http.response.body", "body": self.style.event(status, message),
                                   "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()
            if admitted is not None:
                gate.release(admitted)
            end()


async def _watch_disconnect(receive: Receive, call: HttpCall, task: asyncio.Task[Any]) -> None:
    """Cancels the call's task when its client goes away, so that its engine work stops and its slot is
    freed at once (the request body has been read: what receive() brings now is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if call.complete:  # the server's own "disconnect" once the response is complete
                return
            call.disconnected = True
            task.cancel()
            return
