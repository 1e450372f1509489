"""Assembles the gRPC server: CharRNN service, health, reflection, TLS, metrics, and the engine's lifetime.

    python -m serve --model runs/demo/model.onnx     # prints one ready line, then serves

Health: the whole server ("") and the CharRNN service name report readiness, SERVING only while the
engine takes work (NOT_SERVING while an engine process that died or hung is replaced). The name
`liveness` stays SERVING while the server can still recover, for liveness probes; when the engine
cannot be replaced (serve/process/proxy.py MAX_RESTARTS) everything turns NOT_SERVING and the process
exits 1, so that compose or Kubernetes restarts it.

Model reload (serve/ops/reload.py): every --reload-interval seconds, and at once on SIGHUP, the server
checks its --model file; a changed file that passes the start-up checks serves new calls while calls
in flight finish on the old model; a bad or missing one is refused and the old model kept.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING and new calls get UNAVAILABLE at once; calls in
flight run to completion within --grace seconds; a second signal, or the end of grace, cuts the rest
with UNAVAILABLE and a message saying so. The process then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serve.api.admission import Gate
from serve.api.grpc.inference import InferenceServicer
from serve.api.grpc.interceptors import chain
from serve.api.grpc.servicer import CharRNNServicer
from serve.api.http.app import build_app
from serve.api.http.calls import Policies
from serve.api.http.server import HttpServer, bind
from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb
from serve.api.pb.charrnn.v1 import charrnn_pb2_grpc as pb_grpc
from serve.api.pb.inference import grpc_service_pb2 as inference_pb
from serve.api.pb.inference import grpc_service_pb2_grpc as inference_grpc
from serve.engine.prompt_cache import CHUNK, MB, entry_bytes
from serve.engine.protocol import Engine, EngineState
from serve.engine.runtime import read_model
from serve.errors import ConfigError, DeviceError, EngineFailure, EngineLost, ModelError
from serve.ops.loops import loop_factory
from serve.ops.metrics import Metrics
from serve.ops.reload import Locate, ModelWatcher, file_id, load_model
from serve.ops.repository import locate
from serve.ops.settings import Settings
from serve.ops.version import project_version
from serve.ops.workers import http_line
from serve.process.proxy import MAX_RESTARTS
from serve.service.inference import VERSION as MODEL_VERSION
from serve.service.models import Model, ModelSlot
from serve.service.sequences import Sequences

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CharRNN"].full_name  # "charrnn.v1.CharRNN"
INFERENCE_SERVICE_NAME = inference_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
API_SERVICES = (SERVICE_NAME, INFERENCE_SERVICE_NAME)
READINESS = ("", *API_SERVICES)  # health names that say whether calls can be served now
LIVENESS = "liveness"  # the health name that says whether the server can still recover
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    """A bound grpc.aio server plus the model(s) (engine, process or thread, and services), the file
    watcher and the metrics endpoint whose lifetime it shares."""

    def __init__(self, grpc_server: grpc.aio.Server, models: ModelSlot, watcher: ModelWatcher,
                 health_servicer: health.aio.HealthServicer, gate: Gate, metrics: Metrics, address: str,
                 provider: str, metrics_port: int | None, http: HttpServer | None = None) -> None:
        self.grpc = grpc_server
        self.http = http  # None: --http-port -1
        self.models = models
        self.watcher = watcher
        self.health = health_servicer
        self.gate = gate
        self.metrics = metrics
        self.address = address
        self.provider = provider
        self.metrics_port = metrics_port  # None = metrics off
        self.lost: asyncio.Event | None = None  # set when the engine could not be brought back
        self._health_lock: asyncio.Lock | None = None
        self._health_updates: set[asyncio.Future[None]] = set()  # the loop holds tasks only weakly

    @property
    def engine(self) -> Engine:
        """The current model's engine."""
        return self.models.current.engine

    async def start(self) -> None:
        self.lost, self._health_lock = asyncio.Event(), asyncio.Lock()
        model = self.models.current
        self._watch(model)
        model.engine.start(asyncio.get_running_loop())
        self.metrics.model_info.labels(model.sha256, model.version).set(1)
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        await self._set_health((*READINESS, LIVENESS), SERVING)
        self.watcher.start(self.activate)

    def activate(self, model: Model) -> None:
        """A reload's new model (loaded and checked) takes new calls from now on (on the loop)."""
        self._watch(model)
        model.engine.start(asyncio.get_running_loop())
        old = self.models.swap(model)
        if (old.sha256, old.version) != (model.sha256, model.version):  # 0 first: with --workers the row
            self.metrics.model_info.labels(old.sha256, old.version).set(0)  # lives on in a shared file
            self.metrics.model_info.remove(old.sha256, old.version)
        self.metrics.model_info.labels(model.sha256, model.version).set(1)
        if not self.gate.draining:  # the old engine may have been restarting: this one serves
            self._update_health(READINESS, SERVING)

    def _update_health(self, names: tuple[str, ...], status: int) -> None:
        """_set_health from a callback on the loop; the task is kept until done (the loop holds it weakly)."""
        update = asyncio.ensure_future(self._set_health(names, status))
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    def _watch(self, model: Model) -> None:
        engine = model.engine
        engine.watch(lambda state: self._engine_changed(engine, state))

    def _engine_changed(self, engine: Engine, state: EngineState) -> None:
        if engine is not self.models.current.engine:  # a retired model's engine: its calls see it alone
            return
        names = (*READINESS, LIVENESS) if state is EngineState.FAILED else READINESS
        status = SERVING if state is EngineState.SERVING else NOT_SERVING
        self._update_health(names, status)
        if state is EngineState.FAILED:
            assert self.lost is not None
            self.lost.set()

    async def _set_health(self, names: tuple[str, ...], status: int) -> None:
        assert self._health_lock is not None
        async with self._health_lock:  # updates land in the order the engine reported them
            for name in names:
                await self.health.set(name, status)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stops at once: calls in flight get `grace` seconds, then gRPC cancels them."""
        await self.watcher.close()
        await self.health.enter_graceful_shutdown()
        self.gate.draining = True
        if self.http is None:
            await self.grpc.stop(grace)
        else:  # both transports' calls in flight get the grace, side by side
            await asyncio.gather(self.grpc.stop(grace), self._stop_http(grace))
        self._stop_engines()
        await self.models.stopped()
        self.metrics.close()

    async def _stop_http(self, grace: float | None) -> None:
        """HTTP calls in flight get `grace` seconds (as gRPC's do), then are cut; then uvicorn closes."""
        assert self.http is not None
        if self.gate.calls and grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.gate.wait_idle()), timeout=grace)
        self.gate.abort_all(self.gate.abort_reason or "the server is shutting down")
        await self.http.stop()

    def _stop_engines(self, reason: str = "the server is shutting down") -> None:
        for model in self.models.models:
            model.engine.stop(reason)

    async def drain(self, grace: float, cut: asyncio.Event) -> bool:
        """The SIGTERM path: health NOT_SERVING and new calls UNAVAILABLE at once; calls in flight run
        to completion for up to `grace` seconds, or until `cut` is set (a second SIGTERM); what is
        left then ends with UNAVAILABLE and a message. True when every call finished by itself."""
        await self.watcher.close()  # no model switch while draining
        await self.health.enter_graceful_shutdown()
        self.gate.draining = True
        log.info("draining: %d calls in flight, %.0f s grace", len(self.gate.calls), grace)
        idle = asyncio.ensure_future(self.gate.wait_idle())
        cutting = asyncio.ensure_future(cut.wait())
        await asyncio.wait((idle, cutting), timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finished = idle.done()
        if not finished:
            why = "a second SIGTERM" if cut.is_set() else f"the {grace:g} s grace period ended"
            reason = f"the server is shutting down: {why} before this call finished"
            log.warning("cutting %d calls still in flight: %s", len(self.gate.calls), why)
            self.gate.abort_reason = reason
            # Work inside the engine (every Generate, Predict/Step waiting on a step) fails with the reason.
            await asyncio.get_running_loop().run_in_executor(None, self._stop_engines, reason)
            try:
                await asyncio.wait_for(asyncio.shield(idle), timeout=1.0)
            except TimeoutError:  # calls waiting for the client's next message
                self.gate.abort_all(reason)
                try:
                    await asyncio.wait_for(asyncio.shield(idle), timeout=2.0)
                except TimeoutError:
                    log.error("%d calls did not end after being cut; gRPC cancels them", len(self.gate.calls))
        cutting.cancel()
        idle.cancel()
        await self.stop(grace=1.0)
        return finished

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot read: {error.strerror or error}") from None


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Server TLS credentials from the settings, checked now (a bad file fails at start-up)."""
    if not (settings.tls_cert or settings.tls_key):
        if settings.tls_client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    cert, key = _read("--tls-cert", settings.tls_cert), _read("--tls-key", settings.tls_key)
    try:  # grpc would only complain at the first handshake
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as error:
        raise ConfigError(f"--tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: not a PEM certificate "
                          f"and its matching key ({error.reason or error})") from None
    ca = None
    if settings.tls_client_ca:
        ca = _read("--tls-client-ca", settings.tls_client_ca)
        try:
            ssl.create_default_context(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise ConfigError(f"--tls-client-ca {settings.tls_client_ca}: not a PEM CA bundle ({error})") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def create_server(settings: Settings, reuse_port: bool = False) -> tuple[Server, int]:
    """Loads and checks the model, binds the port (and the metrics port); call `await server.start()`.

    reuse_port: bind with SO_REUSEPORT, for `--workers` processes sharing one port (serve/ops/workers.py).

    Raises ModelError / DeviceError when the model or the device cannot be used, ConfigError for a
    bad TLS file or a missing CHANGELOG.md (the project version).
    """
    credentials = _credentials(settings)
    version = project_version()  # before the engine starts: an image without CHANGELOG.md fails here
    metrics = Metrics()
    locate = _locator(settings)
    try:
        path, model_version = locate()
    except OSError as error:
        raise ModelError("--model-repository", str(error)) from None
    try:  # stat first: a file replaced between the two is seen as changed at the first check
        seen = file_id(path)
    except OSError:
        seen = None
    data = read_model(path)  # the only read until a reload: an engine restart reuses these bytes
    sequences = Sequences(None, settings.max_sequences, settings.sequence_idle_seconds)  # they outlive reloads
    model = load_model(settings, data, metrics, sequences, version, path, model_version)
    engine, provider = model.engine, model.engine.provider
    _log_prompt_cache(settings, model)
    try:  # an engine process is running from here on: it must not outlive a failed start
        models = ModelSlot(model)
        watcher = ModelWatcher(settings.source, locate, settings.reload_interval,
                               lambda data, path, model_version: load_model(settings, data, metrics, sequences,
                                                                            version, path, model_version),
                               lambda: (models.current.sha256, models.current.version), metrics, seen)
        gate = Gate(settings.max_streams, metrics)
        server = grpc.aio.server(interceptors=chain(gate, metrics, settings.auth_token),
                                 options=[("grpc.so_reuseport", int(reuse_port)),
                                          ("grpc.max_receive_message_length", settings.max_message_bytes)])
        pb_grpc.add_CharRNNServicer_to_server(CharRNNServicer(models), server)
        inference_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(models, version, gate), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((*API_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host = settings.address_host
        address = f"{host}:{settings.port}"
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:  # what grpcio raises for a port in use; older releases returned 0
            port = 0
        if port == 0:
            raise OSError(f"cannot bind {host}:{settings.port} (in use, or not an address of this host)")
        http = None
        if settings.http_port >= 0:
            policies = Policies(gate, metrics, settings.auth_token, settings.max_message_bytes)
            app = build_app(models, policies, settings.model_name, version)
            tls = (settings.tls_cert, settings.tls_key, settings.tls_client_ca) if credentials else None
            http = HttpServer(app, bind(settings.host, settings.http_port, reuse_port), tls)
        metrics_port = metrics.serve(settings.host, settings.metrics_port) if settings.metrics_port >= 0 else None
    except BaseException:
        engine.stop("the server did not start")
        raise
    return Server(server, models, watcher, health_servicer, gate, metrics, f"{host}:{port}", provider,
                  metrics_port, http), port


def _locator(settings: Settings) -> Locate:
    """(file, version) to serve now: --model's file as version 1, or the repository's highest (or pinned)."""
    if settings.model:
        return lambda: (settings.model, MODEL_VERSION)
    return lambda: locate(settings.model_repository, settings.model_name, settings.model_version)


def _log_prompt_cache(settings: Settings, model: Model) -> None:
    """GetModelInfo has no field for it (a proto change for one number): the log says how big it is."""
    if not settings.prompt_cache_mb:
        log.info("prompt cache: off (--prompt-cache-mb 0)")
        return
    spec = model.engine.spec
    entry = entry_bytes(spec.num_layers, spec.state_size, len(spec.vocab))
    log.info("prompt cache: %d MiB per worker process, about %d checkpoints of %d bytes, one every %d prompt "
             "characters", settings.prompt_cache_mb, settings.prompt_cache_mb * MB // entry, entry, CHUNK)


StopRequests = Callable[[asyncio.AbstractEventLoop, Callable[[], None]], None]
"""Arranges for `request()` to run on each request to stop: the first drains, the next cuts."""


def on_signals(loop: asyncio.AbstractEventLoop, request: Callable[[], None]) -> None:
    """A server on its own stops on SIGINT and SIGTERM (a `--workers` child asks its parent instead)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request)


def print_ready(settings: Settings, address: str, provider: str) -> None:
    print(f"charrnn serving {settings.source} on {address} ({provider})", flush=True)



async def serve(settings: Settings, reuse_port: bool = False,
                ready: Callable[[Settings, str, str], None] = print_ready,
                stop_requests: StopRequests = on_signals) -> None:
    """Runs until SIGINT/SIGTERM, then drains (see Server.drain); announces readiness (by default the
    ready line, then the metrics line when metrics are on) once it accepts calls."""
    server, _ = create_server(settings, reuse_port)
    await server.start()
    stop, cut = asyncio.Event(), asyncio.Event()

    def on_request() -> None:
        (cut if stop.is_set() else stop).set()

    # Everything loaded so far (modules, the model's spec, the servers) lives as long as the process: out of
    # the collector's sight, each collection walks only what calls allocate (issue 23's breakdown found the
    # collector in every few hundred characters' profile).
    gc.freeze()
    # before the ready lines: a stop requested as soon as they are read drains, rather than kills
    stop_requests(asyncio.get_running_loop(), on_request)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.watcher.check_now)  # --workers too
    ready(settings, server.address, server.provider)
    if server.http is not None and ready is print_ready:  # a --workers child: the parent prints it
        print(http_line(settings, server.http.port), flush=True)
    if server.metrics_port is not None:
        line = f"charrnn metrics on http://{settings.address_host}:{server.metrics_port}/metrics"
        if ready is print_ready:
            print(line, flush=True)
        else:  # a --workers child: stdout belongs to the parent's one ready line
            log.info("%s", line)
    assert server.lost is not None
    lost = asyncio.ensure_future(server.lost.wait())
    tasks = [asyncio.ensure_future(server.wait_for_termination()), asyncio.ensure_future(stop.wait()), lost]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    if lost.done():
        await server.stop(grace=1.0)  # the engine failed what it had; nothing else can be served
    else:
        log.info("shutting down")
        await server.drain(settings.grace, cut)
    for task in tasks:  # after stopping: grpc's shutdown must not see its termination wait cancelled
        task.cancel()
    if lost.done():
        raise EngineLost(f"the engine process could not be restarted ({MAX_RESTARTS} attempts in a row); exiting "
                         "so that the supervisor restarts the server")


def run(settings: Settings, reuse_port: bool = False,
        ready: Callable[[Settings, str, str], None] = print_ready, stop_requests: StopRequests = on_signals) -> int:
    """Serves until stopped; the process exit status: 0, or 2 when the model or device cannot be used."""
    try:
        factory, name = loop_factory(settings.event_loop)
        log.debug("event loop: %s", name)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(settings, reuse_port, ready, stop_requests))
    except (ModelError, ConfigError) as error:  # its message starts with the file's path or the flag
        print(f"charrnn serve: {error}", file=sys.stderr, flush=True)
        return 2
    except EngineLost as error:  # after serving for a while
        print(f"charrnn serve: {error}", file=sys.stderr, flush=True)
        return 1
    except (DeviceError, EngineFailure, OSError) as error:
        print(f"charrnn serve: cannot serve {settings.source}: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
