"""A real server on 127.0.0.1 port 0, on its own event loop in a background thread (tests/serve and others).

Tests talk to it through real channels (sync stubs, or grpc.aio inside asyncio.run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.ops.server import Server, create_server
from serve.ops.settings import Settings


class LiveServer:
    """create_server + start on a private loop; `close()` stops the server and the engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        self.target = f"127.0.0.1:{self.port}"
        http = self.server.http
        self.http_url = f"http://127.0.0.1:{http.port}" if http is not None else ""  # the HTTP side, if on
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.CharRNNStub(self.channel)

    async def _start(self) -> tuple[Server, int]:
        server, port = create_server(self.settings)
        await server.start()
        return server, port

    def close(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def serve_model(model: Path, **overrides: object) -> Iterator[LiveServer]:
    settings = dataclasses.replace(Settings(model=str(model), device="cpu"), **overrides)
    live = LiveServer(settings)
    try:
        yield live
    finally:
        live.close()


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every charrnn_* sample on the server's metrics endpoint (started with metrics_port=0):
    {(name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples if s.name.startswith("charrnn_")}


def post(server: LiveServer, path: str, body: bytes | dict, headers: dict | None = None,
         method: str = "POST") -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP request."""
    url = urllib.parse.urlsplit(server.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data if method == "POST" else None,
                     headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()
