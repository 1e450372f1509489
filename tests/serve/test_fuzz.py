"""Hypothesis over every request field of the four rpcs and over Step state bytes, against a real server.

Whatever arrives, the answer is OK or a deliberate status (INVALID_ARGUMENT; RESOURCE_EXHAUSTED for
size limits; FAILED_PRECONDITION for Step state whose header names another model, which a changed
fingerprint byte does), never INTERNAL or UNKNOWN, and the server stays healthy. The default suite runs a short
pass; `make test-slow` runs the long one (>= 2000 examples).
"""

from __future__ import annotations

import struct

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import serve_model

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
VOCAB = "hielo"
UINT32 = st.integers(0, 2**32 - 1)
FLOAT32 = st.floats(width=32)  # NaN, infinities, subnormals, negative zero included
texts = st.one_of(st.text(alphabet=VOCAB, max_size=40), st.text(max_size=40))


@pytest.fixture(scope="module")
def fuzz_server(hihell_model):
    yield from serve_model(hihell_model, max_chars=64, max_prompt_chars=32, max_message_bytes=4096)


@pytest.fixture(scope="module")
def good_state(fuzz_server) -> bytes:
    return fuzz_server.stub.Step(pb.StepRequest(text="hih"), timeout=10).state


def mutate(good: bytes, data: st.DataObject) -> bytes:
    """Random bytes, or a valid state truncated, extended or with bytes changed."""
    kind = data.draw(st.sampled_from(["random", "truncate", "extend", "flip", "valid", "empty"]))
    if kind == "random":
        return data.draw(st.binary(max_size=200))
    if kind == "truncate":
        return good[:data.draw(st.integers(0, len(good) - 1))]
    if kind == "extend":
        return good + data.draw(st.binary(min_size=1, max_size=16))
    if kind == "flip":
        out = bytearray(good)
        for i in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4)):
            out[i] ^= data.draw(st.integers(1, 255))
        return bytes(out)
    return good if kind == "valid" else b""


def names_another_model(state: bytes, good: bytes) -> bool:
    """A whole, self-consistent header whose fingerprint is not the served model's: the one shape of
    state bytes that may get FAILED_PRECONDITION."""
    if len(state) < 48:
        return False
    magic, version, flags, fingerprint, layers, size = struct.unpack_from("<4sHH32sII", state)
    return ((magic, version, flags) == (b"CRNS", 1, 0) and len(state) == 48 + 4 * layers * size + 32
            and fingerprint != good[8:40])


def generate_request(data: st.DataObject) -> pb.GenerateRequest:
    request = pb.GenerateRequest(prompt=data.draw(texts), max_chars=data.draw(st.one_of(st.integers(0, 70), UINT32)),
                                 top_k=data.draw(UINT32), stop=data.draw(st.lists(texts, max_size=4)))
    for name, strategy in (("temperature", FLOAT32), ("top_p", FLOAT32), ("seed", st.integers(0, 2**64 - 1))):
        if data.draw(st.booleans()):
            setattr(request, name, data.draw(strategy))
    return request


def one_call(server, good: bytes, data: st.DataObject) -> None:
    stub = server.stub
    rpc = data.draw(st.sampled_from(["Generate", "Predict", "Step", "GetModelInfo"]))
    try:
        if rpc == "Generate":
            responses = list(stub.Generate(generate_request(data), timeout=30))
            assert 1 <= len(responses) <= 64
            assert responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        elif rpc == "Predict":
            messages = data.draw(st.lists(st.builds(pb.PredictRequest, text=texts, top_k=UINT32), max_size=4))
            list(stub.Predict(iter(messages), timeout=30))
        elif rpc == "Step":
            state = mutate(good, data)
            try:
                stub.Step(pb.StepRequest(state=state, text=data.draw(texts), top_k=data.draw(UINT32)), timeout=30)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                assert names_another_model(state, good), (state.hex(), error.details())
                assert "this server runs another model" in error.details()
        else:
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).max_chars == 64
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (rpc, error.code(), error.details())


def assert_healthy(server) -> None:
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.stub.Step(pb.StepRequest(text="hihell"), timeout=10).next == "o"
    assert server.server.engine.running


FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(data=st.data())
def test_fuzz_requests(fuzz_server, good_state, data):
    one_call(fuzz_server, good_state, data)


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_fuzz_requests_long(fuzz_server, good_state, data):
    one_call(fuzz_server, good_state, data)


def test_server_is_healthy_after_fuzzing(fuzz_server):
    assert_healthy(fuzz_server)


@pytest.mark.slow
def test_server_is_healthy_after_the_long_fuzz(fuzz_server):
    assert_healthy(fuzz_server)
