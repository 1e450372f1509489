"""Arbitrary JSON (and bytes) thrown at both HTTP APIs never gets a 5xx, never a traceback: bad input is
the client's error (4xx) with a JSON error body, and the server keeps serving."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import post

FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "logprobs",
          "echo", "n", "stream_options", "logit_bias", "suffix", "best_of", "presence_penalty", "user", "inputs",
          "outputs", "parameters", "id"]
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4),
                      max_leaves=12)
BODIES = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8) | VALUES
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROUTES = ["/v1/completions", "/v2/models/charrnn/infer"]
HEADERS = st.none() | st.from_regex(r"-?[0-9a-z]{0,6}", fullmatch=True)


def check(status: int, raw: bytes) -> None:
    assert status < 500, raw[:500]
    if status >= 400:
        error = json.loads(raw)["error"]
        assert error and "Traceback" not in json.dumps(error)


@FAST
@given(body=BODIES, route=st.sampled_from(ROUTES))
def test_arbitrary_json_is_never_a_server_error(hihell_server, body, route):
    if isinstance(body, dict) and route == ROUTES[0] and "max_tokens" in body:
        body["max_tokens"] = body["max_tokens"] if not isinstance(body["max_tokens"], int) else 3
    status, _, raw = post(hihell_server, route, body)
    if status == 200 and raw.startswith(b"data: "):  # a stream: every event is JSON or [DONE]
        assert raw.endswith(b"data: [DONE]\n\n")
        return
    check(status, raw)


@FAST
@given(raw=st.binary(max_size=200), route=st.sampled_from(ROUTES), header=HEADERS)
def test_arbitrary_bytes_are_never_a_server_error(hihell_server, raw, route, header):
    headers = {"inference-header-content-length": header} if header is not None else {}
    status, _, body = post(hihell_server, route, raw, headers=headers)
    check(status, body)
