"""Ask a server over the standard gRPC health protocol whether it serves; exit 0 only when it does.

    python -m serve.healthcheck --target 127.0.0.1:50051            # the whole server ("")
    python -m serve.healthcheck --service charrnn.v1.CharRNN        # one service; target from CHARRNN_PORT

The container HEALTHCHECK and docker compose's `healthcheck:` run this, so it is a real RPC on the
serving path (not a TCP poke) and it imports only grpcio and grpcio-health-checking: it starts in a
fraction of a second, with no model and no torch. Exit status: 0 SERVING; 1 anything else (another
status, no server listening, deadline passed, unknown service).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.tools.channels import add_arguments, open_channel

DEFAULT_PORT = "50051"  # the container port docker-compose.yml gives CHARRNN_PORT


def default_target() -> str:
    """Loopback at the port the server in this container was told to bind."""
    return f"127.0.0.1:{os.environ.get('CHARRNN_PORT') or DEFAULT_PORT}"


def check(target: str, service: str = "", timeout: float = 3.0,
          tls: argparse.Namespace | None = None) -> tuple[bool, str]:
    """One Health/Check call: (serving?, a line saying what was found). Health needs no token."""
    with (open_channel(target, tls) if tls is not None else grpc.insecure_channel(target)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return False, f"{target}: {error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {service or '(server)'}: {status}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=default_target(),
                   help="HOST:PORT of the server (default: 127.0.0.1:$CHARRNN_PORT, else 127.0.0.1:50051)")
    p.add_argument("--service", default="", help="service name to ask about; empty = the whole server")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds before giving up (keep it under the compose healthcheck timeout)")
    add_arguments(p, token=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ok, line = check(args.target, args.service, args.timeout, args)
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
