"""The model being served, and the ones before it while their calls finish: what a reload swaps.

A `Model` is everything that belongs to one model file: the engine that runs its bytes and the
transport-free services over that engine (vocabulary, Step state codec, KServe tensor shapes). A call
takes the current Model as it starts (`ModelSlot.use()`) and keeps it to its end, so no call ever
sees two models, whatever their vocabularies or state sizes. A reload (serve/ops/reload.py) builds a
complete new Model, its engine loaded, checked and started, and `swap`s it in on the event loop; the
old Model's engine is stopped once the last call holding it has ended.

Everything here runs on the event loop thread (no locks): `use` and `swap` are plain attribute updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from serve.engine.protocol import Engine
from serve.service.charrnn import CharRNNService
from serve.service.inference import InferenceService

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Model:
    """One loaded model file and what serves it; `users` counts the calls holding it."""

    engine: Engine
    charrnn: CharRNNService
    inference: InferenceService
    users: int = 0
    retired: bool = False
    version: str = "1"  # the repository version it came from (--model: "1")

    @property
    def sha256(self) -> str:
        return self.engine.spec.sha256


class ModelSlot:
    """The current Model, plus the retired ones that calls in flight still hold."""

    def __init__(self, model: Model) -> None:
        self.current = model
        self.retiring: set[Model] = set()
        self._stopping: set[asyncio.Future[None]] = set()

    @contextlib.contextmanager
    def use(self) -> Iterator[Model]:
        """The current Model, held for the call (its engine is not stopped before the call ends)."""
        model = self.current
        model.users += 1
        try:
            yield model
        finally:
            model.users -= 1
            if model.retired and not model.users:
                self._stop(model)

    def swap(self, model: Model) -> Model:
        """Makes `model` (its engine started) the current one; new calls get it from now on. The old one
        is returned; its engine stops as soon as no call holds it."""
        old, self.current = self.current, model
        old.retired = True
        if old.users:
            self.retiring.add(old)
            log.info("%d calls in flight finish on the previous model (sha256 %s...)", old.users, old.sha256[:12])
        else:
            self._stop(old)
        return old

    @property
    def models(self) -> tuple[Model, ...]:
        """Every Model whose engine runs: the current one first."""
        return (self.current, *self.retiring)

    def _stop(self, model: Model) -> None:
        """Stops a retired Model's engine off the loop (an engine process takes a moment to exit)."""
        self.retiring.discard(model)
        reason = "the server switched to a new model file"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a call's generator closed after its loop ended
            model.engine.stop(reason)
            return
        stopping = loop.run_in_executor(None, model.engine.stop, reason)
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        log.info("stopping the engine of the previous model (sha256 %s...)", model.sha256[:12])

    async def stopped(self) -> None:
        """Returns once the engines of retired Models have stopped."""
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
