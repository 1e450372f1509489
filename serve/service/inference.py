"""Transport-free KServe v2 (Open Inference Protocol) handling: the model's tensors, checks and calls.

ModelInfer runs the raw ONNX contract: `input_ids` INT64 [batch, seq] and `state_in` FP32
[batch, num_layers, state_size] in (state_in left out = the zero state), `logits` FP32
[batch, seq, vocab] and `state_out` FP32 [batch, num_layers, state_size] out, and where the model file has
it `hidden` FP32 [batch, seq, num_layers, hidden_size] (only when asked for by name). Each row of a batch is
one `Engine.infer` call, so the rows of every caller (Generate, Predict, Step, ModelInfer) batch
together in the engine. Under a sequence (serve/service/sequences.py) the server holds the state.

The servicer (serve/api/grpc/inference.py) converts protobuf to these records and back; nothing here knows
about gRPC. Every error names the tensor (or parameter) it is about.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serve.engine.protocol import Engine, EngineState
from serve.errors import InvalidArgument, NotFound
from serve.service.sequences import SequenceControl, SequenceModel, Sequences

# The protocol's fixed-size datatypes this server can read, as numpy dtypes (little-endian, as the binary
# forms of both bindings carry them). BYTES is not fixed-size and no input of ours takes it.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
VERSION = "1"  # --model's one version, as in the Triton repository export writes; a repository's is its number
PLATFORM = "onnxruntime_onnx"
IDS, STATE_IN = "input_ids", "state_in"
LOGITS, STATE_OUT, HIDDEN = "logits", "state_out", "hidden"


@dataclass(frozen=True)
class Tensor:
    """One named tensor as the protocol describes it: `datatype` is the protocol's name (INT64, FP32...)."""

    name: str
    datatype: str
    data: np.ndarray  # its shape is the tensor's, batch dimension included


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class TritonConfig:
    """What config.pbtxt says (export/triton_repo.py writes the same for the defaults), from this server's
    settings: dims exclude the batch dimension."""

    name: str
    max_batch_size: int
    vocab_size: int
    num_layers: int
    state_size: int
    hidden_size: int  # of the `hidden` output; 0: the model file has none
    max_sequence_idle_microseconds: int
    max_candidate_sequences: int
    max_queue_delay_microseconds: int


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str
    inputs: Sequence[Tensor]
    outputs: Sequence[str] = ()  # the requested outputs' names; empty = the default set
    sequence: SequenceControl | None = None


class InferenceService:
    """KServe v2 for the one loaded model, named `model_name`, at `version` (the served one; 1 for --model)."""

    def __init__(self, engine: Engine, model_name: str, max_batch: int, max_ids: int, sequences: Sequences,
                 max_delay_us: int, version: str = VERSION) -> None:
        self.engine = engine
        self.version = version
        self.spec = engine.spec
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_ids = max_ids
        self.sequences = sequences
        self.max_delay_us = max_delay_us
        layers, size = self.spec.state_shape
        vocab = len(self.spec.vocab)
        self.inputs = (TensorSpec(IDS, "INT64", (-1, -1)), TensorSpec(STATE_IN, "FP32", (-1, layers, size)))
        self.outputs = (TensorSpec(LOGITS, "FP32", (-1, -1, vocab)), TensorSpec(STATE_OUT, "FP32", (-1, layers, size)),
                        *((TensorSpec(HIDDEN, "FP32", (-1, -1, layers, self.spec.hidden_size)),)
                          if self.spec.has_hidden else ()))
        self._zero = np.zeros(self.spec.state_shape, dtype=np.float32)
        self._sequence_model = SequenceModel(self.spec.sha256, self._zero)  # sequences outlive a reload
        # ServerReady/ModelReady follow what gRPC health reports: not ready while the engine is replaced.
        self._engine_state = EngineState.SERVING
        engine.watch(self._engine_changed)

    def _engine_changed(self, state: EngineState) -> None:
        self._engine_state = state

    @property
    def ready(self) -> bool:
        return self.engine.running and self._engine_state is EngineState.SERVING

    def check_model(self, name: str, version: str = "") -> None:
        """NotFound unless NAME (and VERSION, when given) is the model this server holds."""
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}: this server serves {self.model_name!r} (--model-name)")
        if version not in ("", self.version):
            raise NotFound(f"unknown version {version!r} of model {name!r}: this server serves version "
                           f"{self.version!r}")

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        self.check_model(name, version)
        return ModelMetadata(self.model_name, (self.version,), PLATFORM, self.inputs, self.outputs)

    def config(self, name: str, version: str = "") -> TritonConfig:
        self.check_model(name, version)
        layers, size = self.spec.state_shape
        hidden = self.spec.hidden_size if self.spec.has_hidden else 0
        return TritonConfig(self.model_name, self.max_batch, len(self.spec.vocab), layers, size, hidden,
                            round(self.sequences.idle_seconds * 1_000_000), self.sequences.max_sequences,
                            self.max_delay_us)

    async def infer(self, request: InferRequest) -> list[Tensor]:
        """The requested outputs (by default logits and state_out, or only logits under a sequence; hidden
        only when asked for), in the model's order."""
        self.check_model(request.model, request.version)
        ids, state = self._inputs(request.inputs)
        wanted = self._wanted(request.outputs, request.sequence is not None)
        traced = HIDDEN in wanted
        control = request.sequence
        if control is None:
            found = await self._rows(ids, state, traced)
        else:
            if state is not None:
                raise InvalidArgument(f"{STATE_IN}: not accepted with sequence_id: the server holds a sequence's "
                                      "state (send only input_ids; ask for state_out to see it)")
            if ids.shape[0] != 1:
                raise InvalidArgument(f"{IDS}: a request in a sequence has batch size 1, got shape {list(ids.shape)}")

            async def one(held: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
                out = await self._rows(ids, held[None], traced)
                return out, out[STATE_OUT][0]
            found = await self.sequences.run(control, one, self.model_name, self._sequence_model)
        return [Tensor(spec.name, spec.datatype, found[spec.name]) for spec in self.outputs if spec.name in wanted]

    async def _rows(self, ids: np.ndarray, state: np.ndarray | None, traced: bool) -> dict[str, np.ndarray]:
        """One engine call per row, all at once: the engine batches them (and with everyone else's).
        traced: the rows are traces, which also return `hidden`."""
        zero = self._zero
        engine = self.engine
        rows: list[tuple[np.ndarray, ...]] = await asyncio.gather(*(
            (engine.trace if traced else engine.infer)(ids[i], zero if state is None else state[i])
            for i in range(len(ids))))
        found = {LOGITS: np.stack([r[0] for r in rows]), STATE_OUT: np.stack([r[1] for r in rows])}
        if traced:
            found[HIDDEN] = np.stack([r[2] for r in rows])
        return found

    def _wanted(self, requested: Sequence[str], in_sequence: bool) -> set[str]:
        known = {spec.name for spec in self.outputs}
        for name in requested:
            if name not in known:
                raise InvalidArgument(f"output {name!r}: the model has no such output (it has "
                                      f"{', '.join(sorted(known))})")
        if requested:
            return set(requested)
        return {LOGITS} if in_sequence else {LOGITS, STATE_OUT}

    def _inputs(self, tensors: Sequence[Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
        specs = {spec.name: spec for spec in self.inputs}
        given: dict[str, Tensor] = {}
        for t in tensors:
            spec = specs.get(t.name)
            if spec is None:
                raise InvalidArgument(f"input {t.name!r}: the model has no such input (it takes {IDS}, {STATE_IN})")
            if t.name in given:
                raise InvalidArgument(f"input {t.name!r} is given twice")
            if t.datatype != spec.datatype:
                raise InvalidArgument(f"input {t.name!r}: datatype {t.datatype}, the model takes {spec.datatype}")
            shape = t.data.shape
            if len(shape) != len(spec.shape) or any(want not in (-1, got)
                                                    for want, got in zip(spec.shape, shape, strict=True)):
                want = ", ".join("-1" if d == -1 else str(d) for d in spec.shape)
                raise InvalidArgument(f"input {t.name!r}: shape {list(shape)}, the model takes [{want}]")
            given[t.name] = t
        if IDS not in given:
            raise InvalidArgument(f"input {IDS!r} is missing (INT64 [batch, seq])")
        ids = given[IDS].data
        batch, length = ids.shape
        if not 0 < batch <= self.max_batch:
            raise InvalidArgument(f"input {IDS!r}: batch size {batch}, the model takes 1..{self.max_batch} "
                                  "(max_batch_size)")
        if length < 1:
            raise InvalidArgument(f"input {IDS!r}: shape {list(ids.shape)} holds no ids (seq must be >= 1)")
        if ids.size > self.max_ids:
            raise InvalidArgument(f"input {IDS!r} holds {ids.size} ids, the limit is {self.max_ids} "
                                  "(--max-prompt-chars)")
        vocab = len(self.spec.vocab)
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidArgument(f"input {IDS!r}: id {int(ids[where])} at {list(where)} is outside the "
                                  f"vocabulary (0..{vocab - 1})")
        state = None
        if STATE_IN in given:
            state = given[STATE_IN].data
            if state.shape[0] != batch:
                raise InvalidArgument(f"input {STATE_IN!r}: batch size {state.shape[0]}, {IDS!r} has {batch}")
            if not np.isfinite(state).all():
                raise InvalidArgument(f"input {STATE_IN!r} holds values that are not finite (NaN or infinity)")
        return ids, state
