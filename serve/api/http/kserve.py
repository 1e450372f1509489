"""KServe v2 REST (the Open Inference Protocol's HTTP/REST binding, as Triton serves it): JSON tensors and
Triton's binary tensor data extension <-> the transport-free InferenceService (serve/service/inference.py),
the same service and sequences the gRPC binding uses.

Routes (NAME = --model-name; every model route also under /versions/1):
    GET  /v2                                server metadata
    GET  /v2/health/live, /v2/health/ready  200, or 503 when not ready (open: no token, no slot)
    GET  /v2/models/NAME[/ready]            model metadata; ready: 200 or 503 (open)
    GET  /v2/models/NAME/config             Triton's model configuration as JSON
    POST /v2/models/NAME/infer              inference, JSON or binary tensors

Binary extension: a request whose JSON is followed by tensor bytes says the JSON's length in the
`Inference-Header-Content-Length` header, and each binary input its size in `parameters.binary_data_size`;
outputs come back binary when asked (`binary_data` on the output, or `binary_data_output` on the request,
which is what tritonclient.http sends by default), after the JSON, with the same header.
Errors: {"error": "..."} with 400, 401, 404, 413, 429 or 503.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.api.admission import Gate
from serve.api.http.calls import HttpCall, Reply
from serve.api.http.openai_protocol import parse_json
from serve.api.triton_config import model_config
from serve.errors import InvalidArgument
from serve.service.inference import DATATYPES, InferenceService, InferRequest, Tensor
from serve.service.models import ModelSlot
from serve.service.sequences import SequenceControl

SERVER_NAME = "charrnn"
# Triton's names for the extensions this binding implements (its ServerMetadata lists them so).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "sequence", "sequence(string_id)")
HEADER_LENGTH = "inference-header-content-length"
MAX_DIMS = 8
MAX_NESTING = MAX_DIMS + 1


class KServeErrors:
    """Errors as the REST binding sends them: {"error": "<message>"}."""

    def response(self, status: int, message: str, param: str | None) -> Response:
        return JSONResponse({"error": message}, status_code=status)

    def event(self, status: int, message: str) -> bytes:
        return json.dumps({"error": message}).encode()  # no route of this surface streams


def _flatten(data: Any, depth: int = 0) -> list[Any]:
    """JSON tensor data, flat or nested (row-major), as one flat list."""
    if not isinstance(data, list):
        return [data]
    if depth > MAX_NESTING:
        raise InvalidArgument("tensor data is nested deeper than any tensor shape this server takes")
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    for x in data:
        out += _flatten(x, depth + 1)
    return out


def _values(name: str, datatype: str, values: list[Any]) -> np.ndarray:
    """JSON values checked against the datatype (no silent truncation of 1.5 to an INT64) as an array."""
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in values)
    elif dtype.kind in "iu":
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    else:
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok:
        raise InvalidArgument(f"input {name!r}: data holds values that are not {datatype}")
    try:
        return np.array(values, dtype=dtype)
    except OverflowError:
        raise InvalidArgument(f"input {name!r}: a value does not fit {datatype}") from None


def _parameters(where: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    parameters = spec.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{where}: parameters must be a JSON object")
    return parameters


def inputs_of(header: Mapping[str, Any], binary: bytes) -> list[Tensor]:
    """The request's tensors as arrays of their declared datatype and shape; binary: the bytes after the
    JSON, consumed by the inputs that declare binary_data_size, in order."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("inputs must be a non-empty list of tensors")
    tensors, at = [], 0
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidArgument("each input must be an object with a name, shape, datatype and data")
        name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
        if datatype not in DATATYPES:
            raise InvalidArgument(f"input {name!r}: datatype {datatype!r} is not one this server reads "
                                  f"({', '.join(DATATYPES)})")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise InvalidArgument(f"input {name!r}: shape {json.dumps(shape)} is not a tensor shape "
                                  "(a list of dimensions >= 0)")
        count, dtype = math.prod(shape), DATATYPES[datatype]
        size = _parameters(f"input {name!r}", spec).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"input {name!r}: binary_data_size must be a whole number of bytes")
            if "data" in spec:
                raise InvalidArgument(f"input {name!r} has both data and binary_data_size")
            if size != count * dtype.itemsize:
                raise InvalidArgument(f"input {name!r}: binary_data_size is {size} bytes, shape {shape} of "
                                      f"{datatype} needs {count * dtype.itemsize}")
            if at + size > len(binary):
                raise InvalidArgument(f"input {name!r}: the body holds {len(binary) - at} bytes of binary data "
                                      f"for it, binary_data_size says {size}")
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=at).reshape(shape)
            at += size
        else:
            if "data" not in spec:
                raise InvalidArgument(f"input {name!r} has no data (nor binary_data_size)")
            if datatype == "FP16":
                raise InvalidArgument(f"input {name!r}: FP16 travels only as binary data")
            values = _flatten(spec["data"])
            if len(values) != count:
                raise InvalidArgument(f"input {name!r}: data holds {len(values)} values, shape {shape} needs {count}")
            array = _values(name, datatype, values).reshape(shape)
        tensors.append(Tensor(name, datatype, array.astype(dtype.newbyteorder("="), copy=False)))
    if at != len(binary):
        raise InvalidArgument(f"the body holds {len(binary) - at} bytes of binary data that no input claims")
    return tensors


def sequence_of(parameters: Mapping[str, Any]) -> SequenceControl | None:
    """The sequence extension's request parameters, as the gRPC binding reads them (serve/api/grpc/tensors.py)."""
    start, end = parameters.get("sequence_start", False), parameters.get("sequence_end", False)
    for name, value in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(value, bool):
            raise InvalidArgument(f"parameter {name!r} must be true or false")
    sequence_id = parameters.get("sequence_id", 0)
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        raise InvalidArgument("parameter 'sequence_id' must be an integer or a string")
    if isinstance(sequence_id, int) and not 0 <= sequence_id < 2**64:
        raise InvalidArgument(f"parameter 'sequence_id' must be in 0..2^64-1, got {sequence_id}")
    if sequence_id in (0, ""):
        if start or end:
            raise InvalidArgument("sequence_start / sequence_end need a non-zero (or non-empty) sequence_id")
        return None
    return SequenceControl(sequence_id, start, end)


def _requested(header: Mapping[str, Any]) -> tuple[tuple[str, ...], dict[str, bool]]:
    """The requested outputs' names, and which of them come back binary."""
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("outputs must be a list")
    default = _parameters("the request", header).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be true or false")
    names, binary = [], {}
    for spec in outputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidArgument("each requested output must be an object with a name")
        flag = _parameters(f"output {spec['name']!r}", spec).get("binary_data", default)
        if not isinstance(flag, bool):
            raise InvalidArgument(f"output {spec['name']!r}: binary_data must be true or false")
        names.append(spec["name"])
        binary[spec["name"]] = flag
    return tuple(dict.fromkeys(names)), {"*": default, **binary}


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary tensor bytes after it."""
    if header_length is None:
        return parse_json(body), b""
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidArgument(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
    if not 0 <= length <= len(body):
        raise InvalidArgument(f"Inference-Header-Content-Length is {length}, the body has {len(body)} bytes")
    return parse_json(body[:length]), body[length:]


class KServeRest:
    def __init__(self, models: ModelSlot, version: str, gate: Gate) -> None:
        self.models = models
        self.version = version
        self.gate = gate

    @property
    def service(self) -> InferenceService:
        return self.models.current.inference

    def _ready(self) -> bool:
        return self.gate.ready(self.service.ready)

    @staticmethod
    def _model(request: Request) -> tuple[str, str]:
        return request.path_params["name"], request.path_params.get("version", "")

    async def server_metadata(self, request: Request, call: HttpCall, reply: Reply) -> None:
        await reply.respond(JSONResponse({"name": SERVER_NAME, "version": self.version,
                                          "extensions": list(EXTENSIONS)}))

    async def live(self, request: Request, call: HttpCall, reply: Reply) -> None:
        await reply.respond(Response(status_code=200))

    async def ready(self, request: Request, call: HttpCall, reply: Reply) -> None:
        await reply.respond(Response(status_code=200 if self._ready() else 503))

    async def model_ready(self, request: Request, call: HttpCall, reply: Reply) -> None:
        self.service.check_model(*self._model(request))
        await reply.respond(Response(status_code=200 if self._ready() else 503))

    async def model_metadata(self, request: Request, call: HttpCall, reply: Reply) -> None:
        meta = self.service.metadata(*self._model(request))
        await reply.respond(JSONResponse({
            "name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs]}))

    async def model_config(self, request: Request, call: HttpCall, reply: Reply) -> None:
        config = model_config(self.service.config(*self._model(request)))
        await reply.respond(JSONResponse(json_format.MessageToDict(config, preserving_proto_field_name=True)))

    async def infer(self, request: Request, call: HttpCall, reply: Reply) -> None:
        name, version = self._model(request)
        with self.models.use() as model:
            service = model.inference
            service.check_model(name, version)  # before the tensors' errors, as on gRPC
            header, binary = split_body(call.body, request.headers.get(HEADER_LENGTH))
            request_id = header.get("id", "")
            if not isinstance(request_id, str):
                raise InvalidArgument("id must be a string")
            outputs, as_binary = _requested(header)
            control = sequence_of(_parameters("the request", header))
            tensors = inputs_of(header, binary)
            results = await service.infer(InferRequest(name, version, tensors, outputs, control))
        body: dict[str, Any] = {"model_name": service.model_name, "model_version": service.version, "outputs": []}
        if request_id:
            body["id"] = request_id
        blobs = []
        for t in results:
            out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.data.shape)}
            if as_binary.get(t.name, as_binary["*"]):
                blob = np.ascontiguousarray(t.data, dtype=DATATYPES[t.datatype]).tobytes()
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = t.data.ravel().tolist()
            body["outputs"].append(out)
        text = json.dumps(body).encode()
        if not blobs:
            await reply.respond(Response(text, media_type="application/json"))
            return
        await reply.respond(Response(b"".join((text, *blobs)), media_type="application/octet-stream",
                                     headers={"Inference-Header-Content-Length": str(len(text))}))
