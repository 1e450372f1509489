"""Drive a KServe v2 server with tritonclient.grpc: a plan of calls in, what each returned out.

    echo '[{"op": "server_metadata"}]' | .venv-triton/bin/python tests/tritonside/kserve.py 127.0.0.1:PORT

Reads a JSON list of calls from stdin and prints a JSON list with one result per call, in order. A call
that fails gives {"error": {"status": "StatusCode.X", "message": ...}}. Calls:

    live, ready, model_ready, server_metadata, model_metadata, model_config   (the sync client)
    infer: ids [[...]], optional state [[[...]]], outputs [...], sequence_id, start, end, model, headers
        (the sync client's infer: raw tensors, as tritonclient sends them)
    typed: the same, sent through tritonclient's generated stub with typed contents
    request: a hand-made ModelInferRequest (inputs: name, datatype, shape, and `values` as typed
        contents or `raw` hex as raw_input_contents) through the generated stub: for malformed tensors
    stream: calls (infer ops) on one ModelStreamInfer stream (start_stream/async_stream_infer), results
        in the order of the callbacks
    concurrent: calls (infer ops) at once through tritonclient.grpc.aio, results in the calls' order
    sleep: seconds

An infer result holds each output as {"shape": [...], "data": nested lists}.
"""

import asyncio
import json
import queue
import sys
import time

import grpc
import numpy as np
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

MODEL = "charrnn"


def _error(e):
    if isinstance(e, InferenceServerException):
        return {"error": {"status": str(e.status()), "message": e.message()}}
    if isinstance(e, grpc.RpcError):
        return {"error": {"status": str(e.code()), "message": e.details()}}
    raise e


def _inputs(call, module):
    ids = np.array(call["ids"], dtype=np.int64)
    inputs = [module.InferInput("input_ids", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    if call.get("state") is not None:
        state = np.array(call["state"], dtype=np.float32)
        inputs.append(module.InferInput("state_in", list(state.shape), "FP32"))
        inputs[1].set_data_from_numpy(state)
    return inputs


def _kwargs(call, module):
    kwargs = {"model_name": call.get("model", MODEL), "inputs": _inputs(call, module)}
    if call.get("outputs"):
        kwargs["outputs"] = [module.InferRequestedOutput(name) for name in call["outputs"]]
    if call.get("headers"):
        kwargs["headers"] = call["headers"]
    if call.get("sequence_id"):
        kwargs.update(sequence_id=call["sequence_id"], sequence_start=call.get("start", False),
                      sequence_end=call.get("end", False))
    return kwargs


def _outputs(result):
    response = result.get_response()
    return {"outputs": {o.name: {"shape": list(o.shape), "data": result.as_numpy(o.name).tolist()}
                        for o in response.outputs}}


def _typed_outputs(response):
    found = {}
    for o in response.outputs:
        values = list(o.contents.fp32_contents)
        found[o.name] = {"shape": list(o.shape), "data": np.array(values, dtype=np.float32).reshape(o.shape).tolist()}
    return {"outputs": found}


def _request(call):
    """A ModelInferRequest made by hand: typed contents unless an input carries `raw` (hex)."""
    request = service_pb2.ModelInferRequest(model_name=call.get("model", MODEL),
                                            model_version=call.get("version", ""))
    for spec in call["inputs"]:
        tensor = request.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        if "raw" in spec:
            request.raw_input_contents.append(bytes.fromhex(spec["raw"]))
        elif spec["datatype"] == "INT64":
            tensor.contents.int64_contents.extend(spec["values"])
        elif spec["datatype"] == "FP32":
            tensor.contents.fp32_contents.extend(spec["values"])
        elif spec["datatype"] == "INT32":
            tensor.contents.int_contents.extend(spec["values"])
    for name in call.get("outputs", ()):
        request.outputs.add(name=name)
    if call.get("sequence_id"):
        request.parameters["sequence_id"].int64_param = call["sequence_id"]
        request.parameters["sequence_start"].bool_param = call.get("start", False)
        request.parameters["sequence_end"].bool_param = call.get("end", False)
    return request


def _typed(call):
    state = call.get("state")
    ids = np.array(call["ids"], dtype=np.int64)
    inputs = [{"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape), "values": ids.ravel().tolist()}]
    if state is not None:
        s = np.array(state, dtype=np.float32)
        inputs.append({"name": "state_in", "datatype": "FP32", "shape": list(s.shape), "values": s.ravel().tolist()})
    return _request({**call, "inputs": inputs})


def _stream(client, calls):
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for call in calls:
            client.async_stream_infer(**_kwargs(call, tc))
        out = []
        for _ in calls:
            result, error = results.get(timeout=60)
            out.append(_error(error) if error is not None else _outputs(result))
        return out
    finally:
        client.stop_stream()


async def _concurrent(target, calls):
    async with tc_aio.InferenceServerClient(target) as client:
        async def one(call):
            try:
                return _outputs(await client.infer(**_kwargs(call, tc_aio)))
            except InferenceServerException as e:
                return _error(e)
        return list(await asyncio.gather(*(one(c) for c in calls)))


def run(client, stub, target, call):
    op = call["op"]
    try:
        if op == "live":
            return {"live": client.is_server_live()}
        if op == "ready":
            return {"ready": client.is_server_ready()}
        if op == "model_ready":
            return {"ready": client.is_model_ready(call.get("model", MODEL), call.get("version", ""))}
        if op == "server_metadata":
            return client.get_server_metadata(as_json=True)
        if op == "model_metadata":
            return client.get_model_metadata(call.get("model", MODEL), as_json=True)
        if op == "model_config":
            return client.get_model_config(call.get("model", MODEL), as_json=True)
        if op == "infer":
            return _outputs(client.infer(**_kwargs(call, tc)))
        if op == "typed":
            return _typed_outputs(stub.ModelInfer(_typed(call)))
        if op == "request":
            response = stub.ModelInfer(_request(call))
            return {"response": json_format.MessageToDict(response, preserving_proto_field_name=True)}
        if op == "stream":
            return _stream(client, call["calls"])
        if op == "concurrent":
            return asyncio.run(_concurrent(target, call["calls"]))
        if op == "sleep":
            time.sleep(call["seconds"])
            return {}
    except (InferenceServerException, grpc.RpcError) as e:
        return _error(e)
    raise ValueError(f"unknown op {op!r}")


def main():
    target = sys.argv[1]
    client = tc.InferenceServerClient(target)
    channel = grpc.insecure_channel(target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        print(json.dumps([run(client, stub, target, call) for call in json.load(sys.stdin)]))
    finally:
        client.close()
        channel.close()


if __name__ == "__main__":
    main()
