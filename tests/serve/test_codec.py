"""Step state bytes: round trip; another model's state is StateFromAnotherModel, every kind of broken
input InvalidArgument, never a crash."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.service.state_codec import StateCodec
from serve.errors import InvalidArgument, StateFromAnotherModel

SHA = "ab" * 32
OTHER = "cd" * 32
FINGERPRINT = range(8, 40)  # the header's model SHA-256


def codec(sha: str = SHA, layers: int = 2, size: int = 8, secret: bytes = b"") -> StateCodec:
    return StateCodec(sha, layers, size, secret)


def state(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 8)).astype(np.float32)


def test_round_trip_is_exact():
    c = codec()
    s = state()
    data = c.encode(s)
    assert len(data) == c.size
    np.testing.assert_array_equal(c.decode(data), s)
    assert c.decode(b"") is None


def test_any_codec_for_the_same_model_accepts_the_state():
    # replicas: no per-process key
    np.testing.assert_array_equal(codec().decode(codec().encode(state())), state())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:-1], "bytes"),
    (lambda d: d[:10], "truncated"),
    (lambda d: d + b"\0", "bytes"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:4] + b"\x02\x00" + d[6:], "version"),
    (lambda d: d[:6] + b"\x01\x00" + d[8:], "flags"),
    (lambda d: d[:40] + b"\x03\x00\x00\x00" + d[44:], "its header \\(3x8 floats\\) says"),
    (lambda d: codec(layers=3).encode(np.zeros((3, 8), np.float32)), "shape 3x8 does not match"),
    (lambda d: d[:50] + bytes([d[50] ^ 0x80]) + d[51:], "checksum"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
])
def test_damaged_state_is_rejected(mutate, message):
    c = codec()
    with pytest.raises(InvalidArgument, match=message):
        c.decode(mutate(c.encode(state())))


@pytest.mark.parametrize("layers, size", [(2, 8), (3, 16)], ids=["same-shape", "other-shape"])
def test_state_of_another_model_says_so_with_both_fingerprints(layers, size):
    with pytest.raises(StateFromAnotherModel) as caught:
        codec(SHA).decode(codec(OTHER, layers, size).encode(np.zeros((layers, size), np.float32)))
    message = str(caught.value)
    assert "this server runs another model (sha256 abababababab...)" in message
    assert "(sha256 cdcdcdcdcdcd...)" in message and "start the chain again" in message


def test_another_models_state_truncated_or_padded_is_broken_not_foreign():
    """The header's own sizes give the length, so a damaged foreign state is not taken for a good one."""
    foreign = codec(OTHER).encode(state())
    for damaged in (foreign[:-1], foreign[:60], foreign + b"\0"):
        with pytest.raises(InvalidArgument, match="truncated or padded"):
            codec(SHA).decode(damaged)


def test_a_secret_separates_deployments():
    keyed = codec(secret=b"s3cret")
    np.testing.assert_array_equal(codec(secret=b"s3cret").decode(keyed.encode(state())), state())
    with pytest.raises(InvalidArgument, match="checksum"):
        codec().decode(keyed.encode(state()))
    with pytest.raises(InvalidArgument, match="checksum"):
        keyed.decode(codec().encode(state()))


def test_non_finite_values_are_rejected():
    c = codec()
    s = state()
    s[1, 3] = np.nan
    with pytest.raises(InvalidArgument, match="non-finite"):
        c.decode(c.encode(s))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    c = codec()
    try:
        c.decode(data)
    except InvalidArgument:
        pass
    except StateFromAnotherModel:  # only a whole header, consistent with the length, gets this far
        layers, size = struct.unpack_from("<II", data, 40)
        assert data[:8] == b"CRNS\x01\x00\x00\x00" and len(data) == 48 + 4 * layers * size + 32
    else:
        assert data == b""


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=48 + 64 + 32 - 1), st.integers(min_value=1, max_value=255))
def test_every_single_byte_change_is_rejected(position, flip):
    """In the fingerprint it reads as another model (documented in the proto); anywhere else, broken."""
    c = codec()
    data = bytearray(c.encode(state()))
    data[position] ^= flip
    with pytest.raises(StateFromAnotherModel if position in FINGERPRINT else InvalidArgument):
        c.decode(bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=48 + 64 + 32 - 1))
def test_every_truncation_is_rejected(length):
    c = codec()
    with pytest.raises(InvalidArgument):
        c.decode(c.encode(state())[:length] or b"x")
