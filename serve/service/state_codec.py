"""Step's state bytes: versioned, bound to the model file, length-checked and checksummed.

Layout (little-endian), version 1:

    offset  size  field
    0       4     magic b"CRNS"
    4       2     version (1)
    6       2     flags (0; anything else is rejected)
    8       32    SHA-256 of the .onnx file the state belongs to
    40      4     num_layers
    44      4     state_size
    48      4*L*S float32 state, [num_layers, state_size] row-major
    end-32  32    tag: HMAC-SHA256(key, every byte before the tag)

Checked in this order, so that "another model" is told apart from "broken bytes": the header's magic,
version and flags; the length the header's own sizes imply (a truncated or padded state of any model
fails here); then the fingerprint: a different one is StateFromAnotherModel (FAILED_PRECONDITION: the
client should start its chain again), because that state's tag is keyed by the other model and cannot
be checked here, so damage confined to the fingerprint bytes reads as another model too. With our
fingerprint: the shape, the tag, and finite floats. Everything else is InvalidArgument.

key = SHA-256(b"charrnn-state-v1" + model SHA-256 + secret). Every replica that serves the same file
(and, when set, the same CHARRNN_STATE_KEY secret) derives the same key, so any of them accepts any state.

What the tag proves. Without CHARRNN_STATE_KEY the key derives from the model's SHA-256 alone, and that
is public: every state carries it (offset 8) and GetModelInfo returns it. Anyone can therefore mint a
state with a valid tag around floats of their choosing. The tag catches corruption and random bytes
(the length check catches truncation, the fingerprint another model's state); it does not catch
deliberate forgery: it is a checksum, not authentication. A state is only floats fed back into the
network (non-finite ones are rejected), so a crafted one can only change that caller's own predictions. With CHARRNN_STATE_KEY set (the same on
every replica) the key is secret, the tag is a real MAC and a forged state is rejected with
INVALID_ARGUMENT: set it when state crosses a trust boundary, e.g. when untrusted clients hold it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np

from serve.errors import InvalidArgument, StateFromAnotherModel

MAGIC = b"CRNS"
VERSION = 1
_HEADER = struct.Struct("<4sHH32sII")
_TAG = 32


class StateCodec:
    """Encodes and checks state bytes for one model (and optional shared secret)."""

    def __init__(self, model_sha256: str, num_layers: int, state_size: int, secret: bytes = b"") -> None:
        self._fingerprint = bytes.fromhex(model_sha256)
        self._shape = (num_layers, state_size)
        self._key = hashlib.sha256(b"charrnn-state-v1" + self._fingerprint + secret).digest()
        self._header = _HEADER.pack(MAGIC, VERSION, 0, self._fingerprint, num_layers, state_size)
        self.size = _HEADER.size + 4 * num_layers * state_size + _TAG

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def encode(self, state: np.ndarray) -> bytes:
        assert state.shape == self._shape, (state.shape, self._shape)
        body = self._header + np.ascontiguousarray(state, dtype="<f4").tobytes()
        return body + self._tag(body)

    def decode(self, data: bytes) -> np.ndarray | None:
        """The state as float32 [num_layers, state_size]; None for empty bytes (the initial state)."""
        if not data:
            return None
        if len(data) < _HEADER.size:
            raise InvalidArgument(f"state is {len(data)} bytes: truncated or not a charrnn state")
        magic, version, flags, fingerprint, layers, size = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise InvalidArgument("state is not a charrnn state (bad magic)")
        if version != VERSION:
            raise InvalidArgument(f"state version {version} is not supported (this server reads {VERSION})")
        if flags != 0:
            raise InvalidArgument(f"state has unknown flags {flags:#x}")
        # The length the header itself implies, checked before the fingerprint: a truncated or padded
        # state is broken whichever model it came from, and that is decidable without its model's key.
        expected = _HEADER.size + 4 * layers * size + _TAG
        if len(data) != expected:
            raise InvalidArgument(f"state is {len(data)} bytes, its header ({layers}x{size} floats) says "
                                  f"{expected} (truncated or padded)")
        if fingerprint != self._fingerprint:
            # A well-formed state of another model: its tag is keyed by that model, so this is as far as
            # it can be checked (damage to these 32 bytes alone reads the same; the proto says so).
            raise StateFromAnotherModel(fingerprint.hex(), self._fingerprint.hex())
        if (layers, size) != self._shape:
            raise InvalidArgument(f"state shape {layers}x{size} does not match the model's "
                                  f"{self._shape[0]}x{self._shape[1]}")
        body, tag = data[:-_TAG], data[-_TAG:]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise InvalidArgument("state checksum mismatch: altered, forged or minted under another key")
        state = np.frombuffer(body, dtype="<f4", offset=_HEADER.size).reshape(self._shape)
        if not np.isfinite(state).all():
            raise InvalidArgument("state holds non-finite values")
        return state.astype(np.float32)
