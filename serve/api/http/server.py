"""uvicorn serving the HTTP app on the server's own event loop, beside grpc.aio.

uvicorn's `Server.serve()` installs signal handlers of its own; the server (serve/ops/server.py) owns the
signals and the drain, so this runs uvicorn's `startup` on a socket bound here (SO_REUSEPORT with
--workers, as the gRPC port) and its `shutdown` when the server stops.
"""

from __future__ import annotations

import socket
import ssl

import uvicorn
from starlette.applications import Starlette

from serve.errors import ConfigError


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); OSError when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {error.strerror or error}") from None
    return sock


class HttpServer:
    """The HTTP side of one server process: a bound socket and the uvicorn server that serves it."""

    def __init__(self, app: Starlette, sock: socket.socket, tls: tuple[str, str, str] | None) -> None:
        """tls: (certificate, key, client CA or "") as the gRPC side takes them (--tls-*)."""
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.scheme = "https" if tls else "http"
        options: dict[str, object] = {}
        if tls:
            cert, key, client_ca = tls
            options = {"ssl_certfile": cert, "ssl_keyfile": key}
            if client_ca:
                options |= {"ssl_ca_certs": client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=1, **options)  # type: ignore[arg-type]  # typed **kwargs
        try:
            config.load()
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"HTTP TLS: {error}") from None
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.lifespan = config.lifespan_class(config)  # what Server.serve() would set (lifespan off)
        self._started = False

    async def start(self) -> None:
        await self._uvicorn.startup(sockets=[self.sock])
        self._started = True

    async def stop(self) -> None:
        """Stops listening and closes every connection; the calls in flight have been drained before."""
        if self._started:
            self._started = False
            await self._uvicorn.shutdown(sockets=[self.sock])
        else:
            self.sock.close()
