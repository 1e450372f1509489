"""KServe v2 tensors and parameters on the wire <-> numpy and the service's records.

A request's tensors come either all as typed `contents` or all as `raw_input_contents` (one entry per
input, in order: flattened row-major little-endian bytes), the two ways the protocol allows; the
response answers the same way. Every error names the tensor or parameter and says what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from serve.api.pb.inference import grpc_service_pb2 as pb
from serve.errors import InvalidArgument
from serve.service.inference import DATATYPES, Tensor
from serve.service.sequences import SequenceControl

# The typed-contents field that carries each datatype (FP16 travels only as raw bytes).
_FIELDS: dict[str, str | None] = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP16": None, "FP32": "fp32_contents", "FP64": "fp64_contents",
}
DTYPES: dict[str, tuple[np.dtype, str | None]] = {name: (dtype, _FIELDS[name]) for name, dtype in DATATYPES.items()}
MAX_DIMS = 8


def _shape(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(f"input {tensor.name!r}: shape {list(shape)} is not a tensor shape "
                              "(dimensions must be >= 0)")
    return shape


def inputs_of(request: pb.ModelInferRequest) -> list[Tensor]:
    """The request's tensors as arrays of their declared datatype and shape."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs "
                              "(one per input, in order)")
    tensors = []
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if tensor.datatype not in DTYPES:
            raise InvalidArgument(f"input {name!r}: datatype {tensor.datatype!r} is not one this server reads "
                                  f"({', '.join(DTYPES)})")
        dtype, field = DTYPES[tensor.datatype]
        shape = _shape(tensor)
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {name!r} has contents while the request uses raw_input_contents")
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise InvalidArgument(f"input {name!r}: raw contents hold {len(data)} bytes, shape {list(shape)} "
                                      f"of {tensor.datatype} needs {count * dtype.itemsize}")
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            if field is None:
                raise InvalidArgument(f"input {name!r}: {tensor.datatype} travels only as raw_input_contents")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise InvalidArgument(f"input {name!r}: contents hold {len(values)} values, shape {list(shape)} "
                                      f"needs {count}")
            try:
                array = np.array(values, dtype=dtype).reshape(shape)
            except OverflowError:
                raise InvalidArgument(f"input {name!r}: a value does not fit {tensor.datatype}") from None
        tensors.append(Tensor(name, tensor.datatype, array.astype(dtype.newbyteorder("="), copy=False)))
    return tensors


def _bool(name: str, parameter: pb.InferParameter) -> bool:
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameter {name!r} must be a bool_param")
    return parameter.bool_param


def sequence_of(parameters: Mapping[str, pb.InferParameter]) -> SequenceControl | None:
    """The sequence extension's parameters: sequence_id (int64, uint64 or string; 0 or "" = none),
    sequence_start, sequence_end (bool)."""
    start = _bool("sequence_start", parameters["sequence_start"]) if "sequence_start" in parameters else False
    end = _bool("sequence_end", parameters["sequence_end"]) if "sequence_end" in parameters else False
    sequence_id: int | str = 0
    if "sequence_id" in parameters:
        p = parameters["sequence_id"]
        kind = p.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param", "string_param"):
            raise InvalidArgument("parameter 'sequence_id' must be an int64_param, uint64_param or string_param")
        sequence_id = getattr(p, kind)
        if isinstance(sequence_id, int) and sequence_id < 0:
            raise InvalidArgument(f"parameter 'sequence_id' must not be negative, got {sequence_id}")
    if sequence_id in (0, ""):
        if start or end:
            raise InvalidArgument("sequence_start / sequence_end need a non-zero (or non-empty) sequence_id")
        return None
    return SequenceControl(sequence_id, start, end)


def response_of(request: pb.ModelInferRequest, model: str, version: str,
                outputs: Sequence[Tensor]) -> pb.ModelInferResponse:
    """The response, raw if the request was raw (Triton's clients read raw), typed contents otherwise."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    raw = bool(request.raw_input_contents)
    for t in outputs:
        out = response.outputs.add(name=t.name, datatype=t.datatype, shape=t.data.shape)
        dtype, field = DTYPES[t.datatype]
        if raw:
            response.raw_output_contents.append(np.ascontiguousarray(t.data, dtype=dtype).tobytes())
        else:
            assert field is not None
            getattr(out.contents, field).extend(t.data.ravel().tolist())
    return response
