"""Domain exceptions, raised anywhere in serve/; serve/api/status.py is the one place that maps them to
gRPC status codes and HTTP statuses (the interceptor chain in serve/api/grpc/interceptors.py and the call
wrapper in serve/api/http/calls.py apply it to every call)."""

from __future__ import annotations


class ServeError(Exception):
    """Base of the errors a client may see; the message is safe to show to it."""


class InvalidArgument(ServeError):
    """The request is malformed: a bad parameter, an unknown character, unusable state bytes. `param`
    names the request field at fault where one is (OpenAI's errors carry it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TooLarge(ServeError):
    """The request body is larger than --max-message-bytes (gRPC refuses such a message itself)."""


class NotFound(ServeError):
    """The request names a model (or version) this server does not hold (KServe's ModelInfer and friends);
    `param` names the request field, as InvalidArgument's does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StateFromAnotherModel(ServeError):
    """Step state that is well formed but bound to another model file (e.g. from a replica still on the
    old model during a rolling deploy): not broken bytes, so the client should start its chain again."""

    def __init__(self, state_sha256: str, model_sha256: str) -> None:
        super().__init__(f"this server runs another model (sha256 {model_sha256[:12]}...) than the one "
                         f"the state belongs to (sha256 {state_sha256[:12]}...): start the chain again "
                         "with empty state")
        self.state_sha256 = state_sha256
        self.model_sha256 = model_sha256


class ModelError(ServeError):
    """The model file is missing, unreadable or does not follow the ONNX contract (start-up only)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class FailedPrecondition(ServeError):
    """The request is well formed but the loaded model cannot answer it, e.g. a trace of a model file
    exported before the `hidden` output existed: the message says what to do (export it again)."""


class ModelChanged(ServeError):
    """The request continues something the server held for another model file than the one it serves
    now (a KServe sequence started before a reload): the client must start over."""


class DeviceError(ServeError):
    """The requested execution device is not available (start-up only)."""


class ConfigError(ServeError):
    """A setting cannot be used, e.g. an unreadable TLS file (start-up only)."""


class EngineFailure(ServeError):
    """onnxruntime failed while this request was in the batch (the details are in the server log);
    other requests are unaffected and a retry may well succeed, hence UNAVAILABLE."""


class Unavailable(ServeError):
    """The server is shutting down, or the engine is not running."""


class EngineLost(Unavailable):
    """The engine process died or hung and could not be restarted: the server exits (non-zero) so
    that its supervisor (compose, Kubernetes) starts it afresh."""


class ResourceExhausted(ServeError):
    """The server is at its limit of concurrent calls; refused at once, never queued."""


class Unauthenticated(ServeError):
    """The call lacks the bearer token the server was started with (or carries another one)."""
