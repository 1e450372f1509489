"""Assembles the gRPC server: CharRNN service, health, reflection, and the engine's lifetime.

    python -m serve --model runs/demo/model.onnx     # prints one ready line, then serves
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serve.batcher import Engine
from serve.errors import DeviceError, ModelError
from serve.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.runtime import Runtime
from serve.service import CharRNNService
from serve.servicer import CharRNNServicer
from serve.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CharRNN"].full_name  # "charrnn.v1.CharRNN"


class Server:
    """A bound grpc.aio server plus the engine thread whose lifetime it shares."""

    def __init__(self, grpc_server: grpc.aio.Server, engine: Engine, health_servicer: health.aio.HealthServicer,
                 address: str, provider: str) -> None:
        self.grpc = grpc_server
        self.engine = engine
        self.health = health_servicer
        self.address = address
        self.provider = provider

    async def start(self) -> None:
        self.engine.start(asyncio.get_running_loop())
        await self.grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace)
        self.engine.stop()

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def create_server(settings: Settings, reuse_port: bool = False) -> tuple[Server, int]:
    """Loads and checks the model, binds the port; call `await server.start()` to serve.

    reuse_port: bind with SO_REUSEPORT, for `--workers` processes sharing one port (serve/workers.py).

    Raises ModelError / DeviceError when the model or the device cannot be used.
    """
    runtime = Runtime(settings.model, settings.device, settings.threads)
    engine = Engine(runtime, settings.max_batch, settings.max_delay_us)
    service = CharRNNService(engine, runtime.provider, settings.max_chars, settings.state_key.encode())
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    pb_grpc.add_CharRNNServicer_to_server(CharRNNServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot bind {host}:{settings.port}")
    return Server(server, engine, health_servicer, f"{host}:{port}", runtime.provider), port


def print_ready(settings: Settings, address: str, provider: str) -> None:
    print(f"charrnn serving {settings.model} on {address} ({provider})", flush=True)


async def serve(settings: Settings, reuse_port: bool = False,
                ready: Callable[[Settings, str, str], None] = print_ready) -> None:
    """Runs until SIGINT/SIGTERM; announces readiness (by default the ready line) once it accepts calls."""
    server, _ = create_server(settings, reuse_port)
    await server.start()
    ready(settings, server.address, server.provider)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.ensure_future(server.wait_for_termination()), asyncio.ensure_future(stop.wait())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down")
    await server.stop(grace=2.0)
    for task in tasks:
        task.cancel()


def run(settings: Settings, reuse_port: bool = False,
        ready: Callable[[Settings, str, str], None] = print_ready) -> int:
    """Serves until stopped; the process exit status: 0, or 2 when the model or device cannot be used."""
    try:
        asyncio.run(serve(settings, reuse_port, ready))
    except ModelError as error:  # its message starts with the file's path
        print(f"charrnn serve: {error}", file=sys.stderr, flush=True)
        return 2
    except (DeviceError, OSError) as error:
        print(f"charrnn serve: cannot serve {settings.model}: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
