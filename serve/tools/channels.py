"""Client-side connection options shared by serve.client and serve.healthcheck (grpcio only: the
healthcheck must start fast, with no model and no numpy).

A server started with --tls-cert needs `--tls-ca` (the CA, or the self-signed certificate itself);
one started with --tls-client-ca also needs `--tls-cert/--tls-key` from the client; one started
with --auth-token needs `--token` (or CHARRNN_AUTH_TOKEN) on every CharRNN call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

TOKEN_ENV = "CHARRNN_AUTH_TOKEN"


def add_arguments(p: argparse.ArgumentParser, token: bool = True) -> None:
    p.add_argument("--tls-ca", help="PEM CA bundle that signed the server's certificate: connect with TLS")
    p.add_argument("--tls-cert", help="PEM client certificate, for servers that require one (mutual TLS)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", help="name to check the server's certificate against, when it "
                                             "differs from the target's host (e.g. connecting to 127.0.0.1)")
    if token:
        p.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""),
                       help=f"bearer token for servers started with --auth-token (default: ${TOKEN_ENV})")


def _read(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        sys.exit(f"{flag} {path}: cannot read: {error.strerror or error}")


def open_channel(target: str, args: argparse.Namespace) -> grpc.Channel:
    """An insecure channel, or a TLS one when --tls-ca (or a client certificate) is given."""
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=_read("--tls-ca", args.tls_ca),
                                               private_key=_read("--tls-key", args.tls_key),
                                               certificate_chain=_read("--tls-cert", args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The call metadata: the bearer token when one is set."""
    token = getattr(args, "token", "")
    return (("authorization", f"Bearer {token}"),) if token else ()
