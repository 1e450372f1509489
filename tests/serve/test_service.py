"""Request validation, property-tested: any request is either accepted or INVALID_ARGUMENT, never a crash."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.errors import InvalidArgument
from serve.engine.runtime import ModelSpec
from serve.service.charrnn import CharRNNService

VOCAB = ("h", "i", "e", "l", "o", " ")


class FakeEngine:
    """Stands in for the engine: records what the service would start."""

    def __init__(self) -> None:
        self.spec = ModelSpec("m.onnx", "00" * 32, VOCAB, "gru", 1, 4, 4)
        self.started: list[tuple] = []

    def generate(self, ids, params, max_chars, stops):
        self.started.append((ids, params, max_chars, stops))
        return object()


def service() -> tuple[CharRNNService, FakeEngine]:
    engine = FakeEngine()
    return CharRNNService(engine, "CPUExecutionProvider", max_chars=100, version="0.0.0"), engine  # type: ignore[arg-type]


floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))


@settings(max_examples=400, deadline=None)
@given(prompt=st.text(max_size=12), max_chars=st.integers(0, 2**32 - 1), temperature=floats,
       top_k=st.integers(0, 2**32 - 1), top_p=floats, seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       stop=st.lists(st.text(max_size=4), max_size=3))
def test_generate_requests_are_accepted_exactly_when_valid(prompt, max_chars, temperature, top_k, top_p, seed,
                                                           stop):
    svc, engine = service()
    valid = (0 < max_chars <= 100
             and (temperature is None or (math.isfinite(temperature) and temperature >= 0))
             and (top_p is None or 0 < top_p <= 1)
             and all(c in VOCAB for c in prompt + "".join(stop)) and all(stop))
    try:
        svc.generate(prompt, max_chars, temperature, top_k, top_p, seed, stop)
    except InvalidArgument as error:
        assert not valid, error
    else:
        assert valid
        ids, params, n, stops = engine.started[-1]
        assert "".join(VOCAB[i] for i in ids) == prompt and n == max_chars and stops == tuple(stop)
        assert params.temperature == (1.0 if temperature is None else temperature)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_encode_names_every_unknown_character(text):
    svc, _ = service()
    unknown = [c for c in dict.fromkeys(text) if c not in VOCAB]
    try:
        ids = svc.encode(text, "text")
    except InvalidArgument as error:
        assert unknown and all(repr(c) in str(error) for c in unknown[:20])
    else:
        assert not unknown and ids.dtype == np.int64 and "".join(VOCAB[i] for i in ids) == text
