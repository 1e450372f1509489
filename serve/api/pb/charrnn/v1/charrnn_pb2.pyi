from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_chars", "temperature", "top_k", "top_p", "seed", "stop")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_chars: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., max_chars: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "index", "logprob", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    index: int
    logprob: float
    finish_reason: FinishReason
    def __init__(self, text: _Optional[str] = ..., index: _Optional[int] = ..., logprob: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("text", "top_k", "hidden")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    text: str
    top_k: int
    hidden: bool
    def __init__(self, text: _Optional[str] = ..., top_k: _Optional[int] = ..., hidden: _Optional[bool] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("text", "probability")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    text: str
    probability: float
    def __init__(self, text: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("input", "next", "probability", "top", "hidden")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    input: str
    next: str
    probability: float
    top: _containers.RepeatedCompositeFieldContainer[Candidate]
    hidden: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, input: _Optional[str] = ..., next: _Optional[str] = ..., probability: _Optional[float] = ..., top: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., hidden: _Optional[_Iterable[float]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("state", "text", "top_k")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    state: bytes
    text: str
    top_k: int
    def __init__(self, state: _Optional[bytes] = ..., text: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("state", "next", "probability", "top")
    STATE_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    state: bytes
    next: str
    probability: float
    top: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, state: _Optional[bytes] = ..., next: _Optional[str] = ..., probability: _Optional[float] = ..., top: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("vocab", "cell", "num_layers", "hidden_size", "state_size", "execution_provider", "model_sha256", "corpus", "steps", "val_loss", "torch_version", "exported_at", "producer", "max_chars", "project_version", "model_version")
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
    PROJECT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    vocab: _containers.RepeatedScalarFieldContainer[str]
    cell: str
    num_layers: int
    hidden_size: int
    state_size: int
    execution_provider: str
    model_sha256: str
    corpus: str
    steps: str
    val_loss: str
    torch_version: str
    exported_at: str
    producer: str
    max_chars: int
    project_version: str
    model_version: str
    def __init__(self, vocab: _Optional[_Iterable[str]] = ..., cell: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., state_size: _Optional[int] = ..., execution_provider: _Optional[str] = ..., model_sha256: _Optional[str] = ..., corpus: _Optional[str] = ..., steps: _Optional[str] = ..., val_loss: _Optional[str] = ..., torch_version: _Optional[str] = ..., exported_at: _Optional[str] = ..., producer: _Optional[str] = ..., max_chars: _Optional[int] = ..., project_version: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...
