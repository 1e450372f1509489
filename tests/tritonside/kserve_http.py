"""Drive a KServe v2 REST server with tritonclient.http: a plan of calls in, what each returned out.

    echo '[{"op": "server_metadata"}]' | .venv-triton/bin/python tests/tritonside/kserve_http.py 127.0.0.1:PORT

Reads a JSON list of calls from stdin and prints a JSON list with one result per call, in order. A call
that fails gives {"error": {"status": "400", "message": ...}} (the HTTP status). Calls:

    live, ready, model_ready, server_metadata, model_metadata, model_config   (the sync client)
    infer: ids [[...]], optional state [[[...]]], outputs [...], binary (inputs and outputs as binary
        data, tritonclient's default; false: JSON), sequence_id, start, end, model, headers
    concurrent: calls (infer ops) at once through tritonclient.http.aio, results in the calls' order

An infer result holds each output as {"shape": [...], "data": nested lists}.
"""

import asyncio
import json
import sys

import numpy as np
import tritonclient.http as tc
import tritonclient.http.aio as tc_aio
from tritonclient.utils import InferenceServerException

MODEL = "charrnn"


def _error(e):
    return {"error": {"status": str(e.status()), "message": e.message()}}


def _kwargs(call, module):
    binary = call.get("binary", True)
    ids = np.array(call["ids"], dtype=np.int64)
    inputs = [module.InferInput("input_ids", list(ids.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids, binary_data=binary)
    if call.get("state") is not None:
        state = np.array(call["state"], dtype=np.float32)
        inputs.append(module.InferInput("state_in", list(state.shape), "FP32"))
        inputs[1].set_data_from_numpy(state, binary_data=binary)
    kwargs = {"model_name": call.get("model", MODEL), "inputs": inputs}
    if call.get("outputs") or not binary:
        names = call.get("outputs") or ["logits", "state_out"]
        kwargs["outputs"] = [module.InferRequestedOutput(name, binary_data=binary) for name in names]
    if call.get("headers"):
        kwargs["headers"] = call["headers"]
    if call.get("sequence_id"):
        kwargs.update(sequence_id=call["sequence_id"], sequence_start=call.get("start", False),
                      sequence_end=call.get("end", False))
    return kwargs


def _outputs(result):
    response = result.get_response()
    return {"outputs": {o["name"]: {"shape": list(o["shape"]), "data": result.as_numpy(o["name"]).tolist(),
                                    "binary": "binary_data_size" in o.get("parameters", {})}
                        for o in response["outputs"]}}


async def _concurrent(target, calls):
    client = tc_aio.InferenceServerClient(target)
    try:
        async def one(call):
            try:
                return _outputs(await client.infer(**_kwargs(call, tc_aio)))
            except InferenceServerException as e:
                return _error(e)
        return list(await asyncio.gather(*(one(c) for c in calls)))
    finally:
        await client.close()


def run(client, target, call):
    op = call["op"]
    try:
        if op == "live":
            return {"live": client.is_server_live()}
        if op == "ready":
            return {"ready": client.is_server_ready()}
        if op == "model_ready":
            return {"ready": client.is_model_ready(call.get("model", MODEL), call.get("version", ""))}
        if op == "server_metadata":
            return client.get_server_metadata()
        if op == "model_metadata":
            return client.get_model_metadata(call.get("model", MODEL))
        if op == "model_config":
            return client.get_model_config(call.get("model", MODEL))
        if op == "infer":
            return _outputs(client.infer(**_kwargs(call, tc)))
        if op == "concurrent":
            return asyncio.run(_concurrent(target, call["calls"]))
    except InferenceServerException as e:
        return _error(e)
    raise ValueError(f"unknown op {op!r}")


def main():
    target = sys.argv[1]
    client = tc.InferenceServerClient(target, concurrency=4)
    try:
        print(json.dumps([run(client, target, call) for call in json.load(sys.stdin)]))
    finally:
        client.close()


if __name__ == "__main__":
    main()
