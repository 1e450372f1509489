"""What the rest of the server may ask of an engine: the `Engine` Protocol and the values it takes.

Two engines implement it: `ThreadEngine` (serve/engine/thread.py: the scheduler in a thread of the
server process) and `ProcessEngine` (serve/process/proxy.py: the same scheduler in a process of its own,
reached over a pipe). The service (serve/service/) and the server (serve/ops/server.py) know only this.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from serve.engine.runtime import ModelSpec

if TYPE_CHECKING:
    from serve.engine.stream import Stream, Traced


class Finish(enum.IntEnum):
    """Why a stream ended (NONE on every character but the last)."""

    NONE = 0
    LENGTH = 1
    STOP = 2


class EngineState(enum.Enum):
    """What health reports follow (serve/ops/server.py)."""

    SERVING = "serving"        # takes work
    RESTARTING = "restarting"  # down (died, or killed when it hung) and being replaced; work is refused
    FAILED = "failed"          # could not be replaced: the server exits so that its supervisor restarts it


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int | None = None   # None = a fresh random seed
    alternatives: int = 0     # report this many most likely characters (temperature 1) beside each one drawn


class Engine(Protocol):
    """Owns the model: batches every caller's work into onnxruntime calls and samples the results."""

    spec: ModelSpec
    vocab: tuple[str, ...]
    provider: str  # the execution provider onnxruntime chose, e.g. CPUExecutionProvider

    @property
    def stats(self) -> Mapping[str, float]:
        """Counters for tests and benchmarks: at least step_calls and step_rows."""

    @property
    def running(self) -> bool:
        """Whether new work is accepted now."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts serving; results are handed to callers on `loop`."""

    def watch(self, callback: Callable[[EngineState], None]) -> None:
        """callback(state) on the loop whenever the engine's state changes (it starts SERVING)."""

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Ends the engine; streams and jobs still in it fail with Unavailable(reason)."""

    def generate(self, prompt: np.ndarray, params: SamplingParams, max_chars: int,
                 stops: Sequence[str] = ()) -> Stream:
        """Starts a Generate stream (Unavailable when not running); iterate it, `close()` it when done."""

    async def predict(self, ids: np.ndarray, state: np.ndarray | None,
                      last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Feeds ids [T] from state (None = zero state): logits [T, V] (last_only: [1, V], the last row,
        all Step uses) and the state after the last id. A caller cancelled before the engine reaches
        its call is dropped, never computed."""

    async def infer(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw model call KServe's ModelInfer makes for one row: ids [T] from state [L, S]; always
        every row of logits [T, V] and the state after the last id, batched with every other caller's work
        (whatever Predict and Step come to need of `predict`)."""

    async def trace(self, ids: np.ndarray, state: np.ndarray | None) -> Traced:
        """predict's every row of logits and final state, and the model's `hidden` output for ids [T]:
        [T, num_layers, hidden_size]. Only for a model that has it (spec.has_hidden)."""


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Series(Protocol):
    def observe(self, amount: float) -> None: ...


class Level(Protocol):
    def set(self, value: float) -> None: ...


class StepMetrics(Protocol):
    """What the scheduler counts, once per onnxruntime call (the prompt cache's, once per admission of
    new streams): prometheus metrics in the server process (serve/ops/metrics.py), a tally shipped to
    it in the engine process (serve/process/child.py)."""

    @property
    def characters(self) -> Counter: ...

    @property
    def cancelled_streams(self) -> Counter: ...

    @property
    def step_seconds(self) -> Series: ...

    @property
    def batch_size(self) -> Series: ...

    @property
    def prompt_cache_hits(self) -> Counter: ...

    @property
    def prompt_cache_misses(self) -> Counter: ...

    @property
    def prompt_cache_saved(self) -> Counter: ...

    @property
    def prompt_cache_evictions(self) -> Counter: ...

    @property
    def prompt_cache_bytes(self) -> Level: ...
