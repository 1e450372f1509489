"""The bearer token (--auth-token), checked the same way by both transports: the gRPC chain reads it from
the `authorization` metadata, the HTTP one from the `Authorization` header."""

from __future__ import annotations

import hmac

from serve.errors import Unauthenticated


class BearerToken:
    def __init__(self, token: str) -> None:
        self._expected = ("Bearer " + token).encode()

    def check(self, presented: str | bytes | None, how: str) -> None:
        """Unauthenticated unless `presented` is 'Bearer <token>'; `how` tells the client where to send it."""
        given = presented.encode() if isinstance(presented, str) else presented or b""
        # compare_digest takes the same time wherever the first difference is
        if not hmac.compare_digest(given, self._expected):
            raise Unauthenticated(f"missing or wrong bearer token: send {how}")
