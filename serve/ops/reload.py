"""The served model follows its --model file (or --model-repository's highest version): loading one model,
and watching for a new one.

With --model-repository the watcher asks serve/ops/repository.py which file to serve at every check: a
new version, or a rollback that moved the highest aside, names another file, which is then read, loaded
and checked exactly as a changed --model file is. A model is known by its SHA-256 and its version.

Every --reload-interval seconds (and at once on SIGHUP) the watcher stats the file. When its identity
(inode, size, modification and change times) differs from the last one seen, it reads the bytes and
hashes them; when the SHA-256 differs from the served model's, it loads them beside the served model
with every check start-up makes (a new engine: the ONNX contract, a test call; serve/engine/runtime.py).
Only a model that passed them takes over: new calls get it, calls in flight finish on the old one,
whose engine stops after the last of them (serve/service/models.py). A file that is missing,
unreadable or fails a check is refused: logged, counted in charrnn_model_reloads_total{result="refused"},
while the old model goes on serving and health stays SERVING. A refused file is not tried again until
it changes (or SIGHUP asks).

Polling, not inotify: inotify does not see changes made from another host on a network volume (NFS,
a Kubernetes PersistentVolumeClaim), which is how export hands a fleet its new model. Writers replace
the file atomically (export/files.py); a file seen changing while it was read waits for the next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve.engine.prompt_cache import MB
from serve.engine.protocol import Engine
from serve.engine.runtime import Runtime
from serve.engine.thread import ThreadEngine
from serve.errors import ServeError
from serve.ops.metrics import Metrics
from serve.ops.settings import Settings
from serve.process.proxy import ProcessEngine
from serve.service.charrnn import CharRNNService
from serve.service.inference import InferenceService
from serve.service.models import Model
from serve.service.sequences import Sequences

log = logging.getLogger(__name__)


def load_model(settings: Settings, data: bytes, metrics: Metrics, sequences: Sequences, version: str,
               path: str, model_version: str) -> Model:
    """A Model over these bytes of PATH, its engine loaded and checked (not started yet); version: the
    project's (GetModelInfo); model_version: the served version ("1" for --model). Blocks for the load;
    raises ModelError / DeviceError / EngineFailure when the bytes cannot be served."""
    engine: Engine
    if settings.engine == "process":  # the engine process loads and checks the model; nothing here does
        engine = ProcessEngine(path, settings.device, settings.threads, settings.max_batch,
                               settings.max_delay_us, metrics=metrics, hang_seconds=settings.engine_hang_seconds,
                               data=data, prompt_cache_mb=settings.prompt_cache_mb, log_level=settings.log_level)
    else:
        engine = ThreadEngine(Runtime(path, settings.device, settings.threads, data=data),
                              settings.max_batch, settings.max_delay_us, metrics=metrics,
                              prompt_cache_bytes=settings.prompt_cache_mb * MB)
    try:  # an engine process is running from here on: it must not outlive a failure
        charrnn = CharRNNService(engine, engine.provider, settings.max_chars, settings.state_key.encode(),
                                 settings.max_prompt_chars, version=version)
        inference = InferenceService(engine, settings.model_name, settings.max_batch, settings.max_prompt_chars,
                                     sequences, settings.max_delay_us, model_version)
    except BaseException:
        engine.stop("the model could not be set up")
        raise
    return Model(engine, charrnn, inference, version=model_version)


@dataclass(frozen=True)
class FileId:
    """What tells that a file changed without reading it; ctime also moves when a copy keeps the mtime."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def file_id(path: str) -> FileId:
    st = os.stat(path)
    return FileId(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class _Look:
    """What one look at the file found: `data` and `sha256` when it changed and was read whole."""

    id: FileId | None = None
    path: str = ""
    version: str = ""
    data: bytes = b""
    sha256: str = ""
    problem: str = ""  # why it could not be read
    settling: bool = False  # it changed while it was read


Locate = Callable[[], tuple[str, str]]  # -> (the file to serve, its version); OSError when there is none


class ModelWatcher:
    """Polls the model file and hands a new model, loaded and checked, to `activate` (given to start).

    locate() names the file to serve and its version (always --model's, or the repository's highest);
    load(data, path, version) builds a Model off the loop (load_model); served() is the (SHA-256, version)
    served now; seen: the file's FileId from before the served bytes were read. source names what is
    watched in the log."""

    def __init__(self, source: str, locate: Locate, interval: float, load: Callable[[bytes, str, str], Model],
                 served: Callable[[], tuple[str, str]], metrics: Metrics, seen: FileId | None) -> None:
        self.path = source
        self._locate = locate
        self.interval = interval
        self._load = load
        self._activate: Callable[[Model], None] = lambda model: None
        self._served = served
        self._metrics = metrics
        self._seen = seen  # the file as it was when the served model's bytes were read
        self._refused = ""  # SHA-256 of the last file refused: not tried again unless asked
        self._missing = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, activate: Callable[[Model], None]) -> None:
        """Starts watching on the running loop; activate(model) makes a new model the served one."""
        self._activate = activate
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def check_now(self) -> None:
        """SIGHUP: check at once, and try the file even if it looks unchanged or was refused before."""
        log.info("SIGHUP: checking the model file %s now", self.path)
        if self._wake is not None:
            self._wake.set()

    async def close(self) -> None:
        """Stops watching; a model still loading is stopped, never served."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval if self.interval > 0 else None)
            forced = self._wake.is_set()
            self._wake.clear()
            try:
                await self.check(forced)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking the model file %s failed", self.path)

    async def check(self, forced: bool = False) -> str:
        """One check: "unchanged", "settling" (seen mid-write: next time), "ok" (now served) or "refused"."""
        loop = asyncio.get_running_loop()
        look = await loop.run_in_executor(None, self._look, forced)
        if look is None:
            return "unchanged"
        if look.problem:
            if self._missing and not forced:
                return "unchanged"  # refused once already: not again at every interval
            self._missing, self._seen = True, None
            return self._refuse(look.problem)
        if look.settling:
            log.info("the model file %s changed while it was read; checking it again in %g s", self.path,
                     self.interval)
            return "settling"
        self._missing, self._seen = False, look.id
        if (look.sha256, look.version) == self._served():
            log.log(logging.INFO if forced else logging.DEBUG, "the model file %s holds the served model", look.path)
            return "unchanged"
        if look.sha256 == self._refused and not forced:
            return "unchanged"
        log.info("the model file %s (version %s) changed (sha256 %s...): loading it beside the served model",
                 look.path, look.version, look.sha256[:12])
        loading = loop.run_in_executor(None, self._load, look.data, look.path, look.version)
        try:
            model = await asyncio.shield(loading)
        except asyncio.CancelledError:  # the server is stopping: the new model must not outlive it
            with contextlib.suppress(Exception):
                built = await loading
                await loop.run_in_executor(None, built.engine.stop, "the server is shutting down")
            raise
        except (ServeError, OSError) as error:
            self._refused = look.sha256
            return self._refuse(str(error))
        old, was = self._served()
        self._activate(model)
        self._refused = ""
        self._metrics.model_reloads.labels("ok").inc()
        log.info("now serving the model file %s, version %s, sha256 %s... (was version %s, %s...)", look.path,
                 look.version, look.sha256[:12], was, old[:12])
        return "ok"

    def _refuse(self, problem: str) -> str:
        self._metrics.model_reloads.labels("refused").inc()
        sha, version = self._served()
        log.error("model reload refused: %s; still serving version %s, sha256 %s...", problem, version, sha[:12])
        return "refused"

    def _look(self, forced: bool) -> _Look | None:
        """Off the loop: None when the file looks as it did, else what reading it found."""
        try:
            path, version = self._locate()
        except OSError as error:
            return _Look(problem=str(error))
        try:
            before = file_id(path)
            if before == self._seen and not forced:
                return None
            data = Path(path).read_bytes()
            after = file_id(path)
        except OSError as error:
            return _Look(problem=f"{path}: cannot read model file: {error.strerror or error}")
        if after != before:
            return _Look(settling=True)
        return _Look(before, path, version, data, hashlib.sha256(data).hexdigest())
