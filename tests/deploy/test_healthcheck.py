"""serve.healthcheck against a real grpc.aio server that runs only the standard health servicer."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support import ROOT

from serve.tools.healthcheck import check, main

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServer:
    """A grpc.aio server on 127.0.0.1 port 0, on its own event loop thread, so sync code can probe it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self._call(self._start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        self.servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def set(self, service: str, status: int) -> None:
        self._call(self.servicer.set(service, status))

    def close(self) -> None:
        self._call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def health_server():
    server = HealthServer()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_exits_0(health_server):
    health_server.set("", SERVING)
    assert main(["--target", f"127.0.0.1:{health_server.port}", "--timeout", "5"]) == 0


def test_not_serving_exits_1(health_server):
    health_server.set("", NOT_SERVING)
    ok, line = check(f"127.0.0.1:{health_server.port}")
    assert not ok and "NOT_SERVING" in line
    assert main(["--target", f"127.0.0.1:{health_server.port}"]) == 1


def test_service_name_is_asked_for(health_server):
    health_server.set("", SERVING)
    health_server.set("charrnn.v1.CharRNN", NOT_SERVING)
    target = f"127.0.0.1:{health_server.port}"
    assert main(["--target", target]) == 0
    assert main(["--target", target, "--service", "charrnn.v1.CharRNN"]) == 1
    ok, line = check(target, "no.such.Service")
    assert not ok and "NOT_FOUND" in line


def test_nothing_listening_fails_fast():
    start = time.monotonic()
    assert main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "10"]) == 1
    assert time.monotonic() - start < 5, "a refused connection must not wait for the deadline"


def test_default_target_follows_charrnn_port(monkeypatch):
    from serve.tools.healthcheck import default_target

    monkeypatch.setenv("CHARRNN_PORT", "6123")
    assert default_target() == "127.0.0.1:6123"
    monkeypatch.delenv("CHARRNN_PORT")
    assert default_target() == "127.0.0.1:50051"


def test_command_line_as_compose_runs_it_imports_no_torch(health_server):
    """`python -m serve.healthcheck` in a fresh interpreter: exit 0, and torch never imported."""
    health_server.set("", SERVING)
    code = ("import runpy, sys; sys.argv = ['healthcheck', '--target', sys.argv[1]]\n"
            "try:\n    runpy.run_module('serve.healthcheck', run_name='__main__')\n"
            "except SystemExit as e:\n    assert 'torch' not in sys.modules; raise")
    proc = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{health_server.port}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SERVING" in proc.stdout
