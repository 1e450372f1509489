"""The HTTP routes: one Starlette app over the same model slot, gate and metrics as the gRPC services.

Starlette (on uvicorn) rather than FastAPI: the routes validate their own requests, because OpenAI's and
KServe's error bodies have to name the parameter in their own shapes, so FastAPI's pydantic layer would be
cost without use; docs/performance.md has the per-character figures. A path no route has answers 404, a wrong
method 405, each in the error shape of the API the path belongs to (/v1: OpenAI's, else KServe's).

The playground's page (serve/web/) is served as its files are: `/` is index.html, `/static/` the rest.
Like the probes it is open (no token, no slot, no log line): it holds no data, and the page itself sends
the token that the API calls it makes need. Its Content-Security-Policy allows this origin only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from serve.api.http.calls import ErrorStyle, Policies, peer_of
from serve.api.http.charrnn import CharRNNRest
from serve.api.http.kserve import KServeErrors, KServeRest
from serve.api.http.openai_protocol import OpenAIErrors
from serve.api.http.openai_serving import OpenAIServing
from serve.service.models import ModelSlot

log = logging.getLogger(__name__)

OPENAI, KSERVE = OpenAIErrors(), KServeErrors()
WEB = Path(__file__).resolve().parents[2] / "web"  # serve/web: the playground's static files
# Nothing from another origin, no inline script or style: what the page loads and fetches is this server's.
PAGE_HEADERS = {"content-security-policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


class _Page(StaticFiles):
    """The page's files, with PAGE_HEADERS."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


async def _index(request: Request) -> Response:
    return FileResponse(WEB / "index.html", headers=PAGE_HEADERS)


def _model_routes(suffix: str, endpoint: Any, methods: list[str]) -> list[BaseRoute]:
    """A KServe model route, with and without /versions/{version}."""
    return [Route("/v2/models/{name}" + suffix, endpoint, methods=methods),
            Route("/v2/models/{name}/versions/{version}" + suffix, endpoint, methods=methods)]


def build_app(models: ModelSlot, policies: Policies, model_name: str, version: str) -> Starlette:
    openai = OpenAIServing(models, model_name)
    kserve = KServeRest(models, version, policies.gate)
    charrnn = CharRNNRest(models, model_name)
    route = policies.route
    routes: list[BaseRoute] = [
        Route("/v1/completions", route("completions", openai.completions, OPENAI, streams=True), methods=["POST"]),
        Route("/v1/models", route("models", openai.models_list, OPENAI), methods=["GET"]),
        Route("/v1/chat/completions", route("chat_completions", openai.chat, OPENAI), methods=["POST"]),
        Route("/v1/trace", route("Trace", charrnn.trace, OPENAI), methods=["POST"]),
        Route("/v1/model", route("GetModelInfo", charrnn.model_info, OPENAI), methods=["GET"]),
        Route("/v2", route("ServerMetadata", kserve.server_metadata, KSERVE), methods=["GET"]),
        Route("/v2/health/live", route("ServerLive", kserve.live, KSERVE, probe=True), methods=["GET"]),
        Route("/v2/health/ready", route("ServerReady", kserve.ready, KSERVE, probe=True), methods=["GET"]),
        *_model_routes("", route("ModelMetadata", kserve.model_metadata, KSERVE), ["GET"]),
        *_model_routes("/ready", route("ModelReady", kserve.model_ready, KSERVE, probe=True), ["GET"]),
        *_model_routes("/config", route("ModelConfig", kserve.model_config, KSERVE), ["GET"]),
        *_model_routes("/infer", route("ModelInfer", kserve.infer, KSERVE), ["POST"]),
        Route("/", _index, methods=["GET", "HEAD"]),
        Mount("/static", _Page(directory=WEB), name="static"),
    ]

    async def no_route(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        style: ErrorStyle = OPENAI if request.url.path.startswith("/v1/") else KSERVE
        status = error.status_code
        message = (f"no route {request.method} {request.url.path}" if status == 404 else
                   f"{request.method} is not allowed on {request.url.path}" if status == 405 else error.detail)
        log.info("%s peer=%s %s status=%d", request.url.path, peer_of(request.scope), request.method, status)
        response = style.response(status, message, None)
        response.headers.update(error.headers or {})
        return response

    return Starlette(routes=routes, exception_handlers={HTTPException: no_route})
