"""charrnn's own HTTP routes, beside the OpenAI and KServe ones: what the playground (serve/web/) needs that
neither of those APIs carries.

    POST /v1/trace   {"text": "hihell", "top_k": 5}  -> per character: the input, the most likely next
                     character and its probability, the top_k candidates; and `hidden`, every layer's h
                     after every character (gRPC: Predict with hidden set)
    GET  /v1/model   GetModelInfo's facts: vocabulary, cell, sizes, validation loss, SHA-256, version

`hidden` travels as the model's own float32 values, not rounded: base64 of their little-endian bytes with
the shape [chars, num_layers, hidden_size] (C order), a third of the size of the same numbers in JSON and
exactly what `new Float32Array(bytes.buffer)` reads in a browser. Errors are OpenAI's shape, as for every
/v1 route (400 for a bad request, or for a model file exported before `hidden` existed).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.api.http.calls import HttpCall, Reply
from serve.api.http.openai_protocol import parse_json
from serve.engine.runtime import PROVENANCE
from serve.errors import InvalidArgument, NotFound
from serve.service.charrnn import MAX_ALTERNATIVES, MAX_TRACE_CHARS, CharRNNService, Trace
from serve.service.models import ModelSlot

DEFAULT_TOP_K = 5
TRACE_FIELDS = frozenset({"text", "top_k", "model"})


@dataclass(frozen=True)
class TraceRequest:
    text: str
    top_k: int
    model: str | None


def trace_request(body: Mapping[str, Any]) -> TraceRequest:
    """The checked request; InvalidArgument naming the field for anything else."""
    unknown = sorted(set(body) - TRACE_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown field {unknown[0]!r}: a trace takes text, top_k and model", unknown[0])
    text = body.get("text")
    if not isinstance(text, str) or not text:
        raise InvalidArgument("text is required: one or more characters of the model's vocabulary", "text")
    if len(text) > MAX_TRACE_CHARS:
        raise InvalidArgument(f"text is {len(text)} characters, the limit for a trace is {MAX_TRACE_CHARS}", "text")
    top_k = body.get("top_k", DEFAULT_TOP_K)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= MAX_ALTERNATIVES:
        raise InvalidArgument(f"top_k must be an integer between 0 and {MAX_ALTERNATIVES}, got {json.dumps(top_k)}",
                              "top_k")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidArgument(f"model must be a string, got {json.dumps(model)}", "model")
    return TraceRequest(text, top_k, model)


def floats(values: np.ndarray) -> dict[str, Any]:
    """A float32 array as JSON: its shape and the base64 of its little-endian bytes in C order."""
    data = np.ascontiguousarray(values, dtype="<f4")
    return {"dtype": "float32", "byteorder": "little", "shape": list(data.shape),
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def trace_body(trace: Trace, text: str, model_name: str, sha256: str) -> dict[str, Any]:
    return {
        "object": "trace", "model": model_name, "model_sha256": sha256, "text": text,
        "chars": [{"input": p.input, "next": p.next, "probability": p.probability,
                   "top": [{"text": t, "probability": q} for t, q in p.top]} for p in trace.predictions],
        "hidden": floats(trace.hidden),
    }


def model_body(service: CharRNNService, model_name: str) -> dict[str, Any]:
    """GetModelInfo's fields under the same names, plus what the playground needs to know of the API."""
    info = service.info()
    spec = info.spec
    return {
        "object": "model_info", "id": model_name, "vocab": list(spec.vocab), "cell": spec.cell,
        "num_layers": spec.num_layers, "hidden_size": spec.hidden_size, "state_size": spec.state_size,
        "execution_provider": info.execution_provider, "model_sha256": spec.sha256, "max_chars": info.max_chars,
        "project_version": info.project_version, **{k: spec.provenance.get(k, "") for k in PROVENANCE},
        "hidden": spec.has_hidden, "max_trace_chars": MAX_TRACE_CHARS,
    }


class CharRNNRest:
    def __init__(self, models: ModelSlot, model_name: str) -> None:
        self.models = models
        self.model_name = model_name

    async def trace(self, request: Request, call: HttpCall, reply: Reply) -> None:
        req = trace_request(parse_json(call.body))
        if req.model is not None and req.model != self.model_name:
            raise NotFound(f"The model {req.model!r} does not exist: this server serves {self.model_name!r}", "model")
        with self.models.use() as model:
            service = model.charrnn
            service.check_hidden()  # before the text: the page says "export again" whatever was typed
            trace = await service.trace(req.text, req.top_k, max_chars=MAX_TRACE_CHARS)
            body = trace_body(trace, req.text, self.model_name, service.spec.sha256)
        await reply.respond(JSONResponse(body))

    async def model_info(self, request: Request, call: HttpCall, reply: Reply) -> None:
        await reply.respond(JSONResponse(model_body(self.models.current.charrnn, self.model_name)))
