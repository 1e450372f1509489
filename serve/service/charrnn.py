"""Transport-free request handling: validation, text <-> token ids, and calls into the engine.

The servicer converts protobuf messages to these calls and back; nothing here knows about gRPC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serve.engine import sampling
from serve.engine.protocol import Engine, SamplingParams
from serve.engine.runtime import ModelSpec
from serve.engine.stream import Stream
from serve.errors import FailedPrecondition, InvalidArgument
from serve.service.state_codec import StateCodec

MAX_STOPS = 16        # each stop string is checked after every character: bound the per-character work
MAX_STOP_CHARS = 256
MAX_ALTERNATIVES = 20  # per character; OpenAI's completions allow 5, more is for the playground's view
# A trace's text (HTTP /v1/trace): its answer holds num_layers x hidden_size floats per character, so 4096
# characters of a 2 x 256 model are 8 MiB of float32; the playground's lesson texts are a few hundred.
MAX_TRACE_CHARS = 4096


@dataclass(frozen=True)
class Prediction:
    """The model's guess after one input character."""

    input: str
    next: str
    probability: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Trace:
    """Predictions for a text with the model's hidden state after each of its characters."""

    predictions: list[Prediction]
    hidden: np.ndarray  # float32 [T, num_layers, hidden_size]: every layer's h (LSTM: the h half)
    state: np.ndarray   # the recurrent state after the last character


@dataclass(frozen=True)
class StepResult:
    state: bytes
    prediction: Prediction


@dataclass(frozen=True)
class Scored:
    """A text scored by the model: each character's log-probability given the ones before it (the first
    character's is None: nothing comes before it) and the most likely characters at each position."""

    logprobs: list[float | None]
    alternatives: list[list[tuple[str, float]] | None]


@dataclass(frozen=True)
class ModelInfo:
    spec: ModelSpec
    execution_provider: str
    max_chars: int
    project_version: str


class CharRNNService:
    """What the API does, for one loaded model."""

    def __init__(self, engine: Engine, provider: str, max_chars: int, state_secret: bytes = b"",
                 max_prompt_chars: int = 10_000, *, version: str) -> None:
        """version: the project version (serve/ops/version.py) that GetModelInfo reports."""
        self.engine = engine
        self.version = version
        self.spec = engine.spec
        self.provider = provider
        self.max_chars = max_chars
        self.max_prompt_chars = max_prompt_chars
        self.codec = StateCodec(self.spec.sha256, self.spec.num_layers, self.spec.state_size, state_secret)
        self.vocab = self.spec.vocab
        self._ids = {c: i for i, c in enumerate(self.vocab)}

    def encode(self, text: str, what: str) -> np.ndarray:
        """Token ids for text; InvalidArgument naming every character the model does not know."""
        if len(text) > self.max_prompt_chars:
            raise InvalidArgument(f"{what} is {len(text)} characters, the limit is {self.max_prompt_chars} "
                                  "(--max-prompt-chars)")
        ids = self._ids
        try:
            return np.fromiter((ids[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError:
            unknown = list(dict.fromkeys(c for c in text if c not in ids))
            shown = ", ".join(repr(c) for c in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
            raise InvalidArgument(f"{what} has characters outside the model's vocabulary: {shown}") from None

    def knows(self, text: str) -> bool:
        """Whether every character of text is in the model's vocabulary."""
        ids = self._ids
        return all(c in ids for c in text)

    def generate(self, prompt: str, max_chars: int, temperature: float | None = None, top_k: int = 0,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
                 alternatives: int = 0) -> Stream:
        """Validates a Generate request and starts its stream in the engine. alternatives: the stream also
        reports this many most likely characters at each position (Stream.alternatives)."""
        if not 0 < max_chars <= self.max_chars:
            raise InvalidArgument(f"max_chars must be in 1..{self.max_chars}, got {max_chars}")
        if temperature is None:
            temperature = 1.0
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {temperature}")
        if top_p is None:
            top_p = 1.0
        if not 0 < top_p <= 1:  # also rejects NaN
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        ids = self.encode(prompt, "prompt")
        if len(stop) > MAX_STOPS:
            raise InvalidArgument(f"stop has {len(stop)} strings, the limit is {MAX_STOPS}")
        for i, s in enumerate(stop):
            if not s:
                raise InvalidArgument(f"stop[{i}] is empty")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidArgument(f"stop[{i}] is {len(s)} characters, the limit is {MAX_STOP_CHARS}")
            self.encode(s, f"stop[{i}]")
        if not 0 <= alternatives <= MAX_ALTERNATIVES:
            raise InvalidArgument(f"alternatives must be in 0..{MAX_ALTERNATIVES}, got {alternatives}")
        params = SamplingParams(float(temperature), int(top_k), float(top_p), seed, alternatives)
        return self.engine.generate(ids, params, max_chars, tuple(stop))

    def _predictions(self, text: str, logits: np.ndarray, top_k: int) -> list[Prediction]:
        best, prob, top, top_prob = sampling.most_likely(logits, top_k)
        vocab = self.vocab
        return [Prediction(c, vocab[b], p, tuple(zip((vocab[t] for t in ts), tp, strict=True)))
                for c, b, p, ts, tp in zip(text, best.tolist(), prob.tolist(), top.tolist(), top_prob.tolist(),
                                           strict=True)]

    def _text_ids(self, text: str) -> np.ndarray:
        """Predict's and Step's text, checked (not empty, within limits, in the vocabulary) and encoded."""
        if not text:
            raise InvalidArgument("text is empty: send one or more characters")
        return self.encode(text, "text")

    async def predict(self, text: str, top_k: int, state: np.ndarray | None) -> tuple[list[Prediction], np.ndarray]:
        """One prediction per character of text, from state (None = initial); returns the new state."""
        logits, state_out = await self.engine.predict(self._text_ids(text), state)
        return self._predictions(text, logits, top_k), state_out

    def check_hidden(self) -> None:
        """FailedPrecondition unless the model file has the `hidden` output."""
        if not self.spec.has_hidden:
            raise FailedPrecondition("this model file has no 'hidden' output (it was exported before charrnn "
                                     "wrote one): export it again with `python -m export RUN_DIR` to see the "
                                     "hidden state")

    async def trace(self, text: str, top_k: int, state: np.ndarray | None = None,
                    max_chars: int | None = None) -> Trace:
        """Predict, with every layer's hidden state after each character. max_chars: a bound of the
        caller's below --max-prompt-chars (the HTTP route's MAX_TRACE_CHARS)."""
        self.check_hidden()
        if max_chars is not None and len(text) > max_chars:
            raise InvalidArgument(f"text is {len(text)} characters, the limit for a trace is {max_chars}", "text")
        logits, state_out, hidden = await self.engine.trace(self._text_ids(text), state)
        return Trace(self._predictions(text, logits, top_k), hidden, state_out)

    async def step(self, state: bytes, text: str, top_k: int) -> StepResult:
        """Predict with the state carried by the client as bytes."""
        ids = self._text_ids(text)  # a request wrong in both gets the text's error, as before
        logits, state_out = await self.engine.predict(ids, self.codec.decode(state), last_only=True)
        last = self._predictions(text[-1], logits[-1:], top_k)[0]
        return StepResult(self.codec.encode(state_out), last)

    async def score(self, text: str, alternatives: int) -> Scored:
        """Each character's log-probability after the ones before it, and the `alternatives` most likely
        characters at each position, from one Predict over the text (OpenAI's echo with logprobs)."""
        ids = self.encode(text, "prompt")
        if len(ids) < 2:  # the first character has no score: nothing to compute
            return Scored([None] * len(ids), [None] * len(ids))
        logits, _ = await self.engine.predict(ids[:-1], None)
        logp = sampling.logprobs(logits)
        picked: list[float] = logp[np.arange(len(ids) - 1), ids[1:]].tolist()
        top = np.argsort(-logp, axis=1, kind="stable")[:, :alternatives]
        vocab = self.vocab
        alts: list[list[tuple[str, float]] | None] = [None]
        for row_ids, row_lps in zip(top.tolist(), np.take_along_axis(logp, top, axis=1).tolist(), strict=True):
            alts.append([(vocab[i], lp) for i, lp in zip(row_ids, row_lps, strict=True)])
        return Scored([None, *picked], alts)

    def info(self) -> ModelInfo:
        return ModelInfo(self.spec, self.provider, self.max_chars, self.version)

