"""Hypothesis over ModelInfer requests (tensors, contents, raw bytes, parameters) against a real server:
the answer is OK or a deliberate status naming what is wrong, never INTERNAL or UNKNOWN."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import serve_model

from serve.api.pb.inference import grpc_service_pb2 as pb
from serve.api.pb.inference import grpc_service_pb2_grpc as pb_grpc

ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
NAMES = st.sampled_from(["input_ids", "state_in", "logits", "x", ""])
DATATYPES = st.sampled_from(["INT64", "FP32", "INT32", "FP16", "BYTES", "UINT64", "BOOL", "int64"])
SHAPES = st.lists(st.integers(-2, 6), max_size=4)


@pytest.fixture(scope="module")
def fuzz_server(hihell_model):
    yield from serve_model(hihell_model, max_prompt_chars=32, max_sequences=4, max_message_bytes=1 << 16)


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["charrnn", "other", ""])),
                                   model_version=draw(st.sampled_from(["", "1", "2"])))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(NAMES), datatype=draw(DATATYPES), shape=draw(SHAPES))
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=120)))
        elif draw(st.booleans()):
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-3, 8), max_size=30)))
        else:
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=30)))
    for name in draw(st.lists(NAMES, max_size=2)):
        request.outputs.add(name=name)
    kind = draw(st.sampled_from(["none", "int64", "uint64", "string", "double"]))
    if kind == "int64":
        request.parameters["sequence_id"].int64_param = draw(st.integers(-2, 5))
    elif kind == "uint64":
        request.parameters["sequence_id"].uint64_param = draw(st.integers(0, 2**64 - 1))
    elif kind == "string":
        request.parameters["sequence_id"].string_param = draw(st.text(max_size=5))
    elif kind == "double":
        request.parameters["sequence_id"].double_param = 1.5
    for flag in ("sequence_start", "sequence_end"):
        if draw(st.booleans()):
            request.parameters[flag].bool_param = draw(st.booleans())
    return request


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_model_infer_never_fails_internally(fuzz_server, request):
    stub = pb_grpc.GRPCInferenceServiceStub(fuzz_server.channel)
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details(), request)
        assert error.details() and "internal" not in error.details().lower()
