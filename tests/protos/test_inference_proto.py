"""protos/inference is wire-compatible with what tritonclient ships: same names, numbers and types.

protos/inference/grpc_service.proto is compiled here with grpc_tools.protoc, under the -I mapping the
Makefile's protos target uses, into a descriptor set (nothing is generated into the tree); tritonclient's
descriptors come from .venv-triton (tests/tritonenv.py). Every message, enum and
rpc we define is compared with tritonclient's, and messages built from our definitions are read by
tritonclient's classes and written back.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, text_format
from support import ROOT
from tritonenv import run_tritonside

from export.triton_repo import TritonModel, config_pbtxt

FieldType = descriptor_pb2.FieldDescriptorProto
# The one message we keep only part of (protos/inference/grpc_service.proto says why); every other
# message, every enum and every rpc we define must equal tritonclient's exactly.
PARTIAL = {"inference.ModelConfig"}
RPCS = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig"}


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("inference") / "inference.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iserve/api/pb=protos",
                    f"--descriptor_set_out={out}", "protos/inference/grpc_service.proto"],
                   cwd=ROOT, check=True, capture_output=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.fixture(scope="module")
def tritonclient_side() -> dict:
    return run_tritonside("descriptors.py")


def described(files: descriptor_pb2.FileDescriptorSet) -> dict[str, dict]:
    """Full name -> what the wire depends on, for every message, enum and service of package inference."""
    found: dict[str, dict] = {}

    def enum(prefix: str, e) -> None:
        found[f"{prefix}.{e.name}"] = {"values": {v.name: v.number for v in e.value}}

    def message(prefix: str, m) -> None:
        name = f"{prefix}.{m.name}"
        found[name] = {"map_entry": m.options.map_entry, "fields": {
            f.name: (f.number, FieldType.Type.Name(f.type), FieldType.Label.Name(f.label), f.type_name,
                     m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None, f.proto3_optional)
            for f in m.field}}
        for e in m.enum_type:
            enum(name, e)
        for n in m.nested_type:
            message(name, n)

    for file in files.file:
        if file.package != "inference":
            continue
        for e in file.enum_type:
            enum("inference", e)
        for m in file.message_type:
            message("inference", m)
        for s in file.service:
            found[f"inference.{s.name}"] = {"methods": {
                x.name: (x.input_type, x.output_type, x.client_streaming, x.server_streaming) for x in s.method}}
    return found


def test_the_triton_env_holds_the_pinned_versions(tritonclient_side):
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==([\w.]+)",
                           (ROOT / "requirements/tritonclient.txt").read_text(), re.M))
    for name, version in tritonclient_side["versions"].items():
        assert pins[name] == version, f"{name} {version} in .venv-triton, {pins[name]} pinned: make install"
    assert tritonclient_side["versions"]["protobuf"].startswith("6.")


def test_every_definition_matches_tritonclient(ours, tritonclient_side):
    theirs = described(descriptor_pb2.FileDescriptorSet.FromString(
        base64.b64decode(tritonclient_side["descriptor_set"])))
    mine = described(ours)
    assert set(mine) <= set(theirs), f"not in tritonclient's protocol: {sorted(set(mine) - set(theirs))}"
    for name, ours_of in mine.items():
        theirs_of = theirs[name]
        if "methods" in ours_of:
            assert set(ours_of["methods"]) == RPCS
            for rpc, signature in ours_of["methods"].items():
                assert signature == theirs_of["methods"][rpc], f"{name}.{rpc}"
        elif name in PARTIAL:
            assert ours_of["map_entry"] == theirs_of["map_entry"]
            for field, wire in ours_of["fields"].items():
                assert wire == theirs_of["fields"].get(field), f"{name}.{field}"
        else:
            assert ours_of == theirs_of, name
    # The messages of every rpc we define are ours too, so none of them was left to a partial copy.
    for rpc in mine["inference.GRPCInferenceService"]["methods"].values():
        assert rpc[0].lstrip(".") in mine and rpc[1].lstrip(".") in mine


def _classes(files: descriptor_pb2.FileDescriptorSet):
    pool = descriptor_pool.DescriptorPool()  # a private pool: the generated stubs may use the default one
    for file in files.file:
        pool.Add(file)
    return lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))


def test_messages_cross_the_wire_both_ways(ours):
    pb = _classes(ours)
    request = pb("ModelInferRequest")(model_name="charrnn", model_version="1", id="req-1")
    request.parameters["sequence_id"].int64_param = 42
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = False
    request.parameters["big"].uint64_param = 2**64 - 1
    request.parameters["tag"].string_param = "s-1"
    request.parameters["ratio"].double_param = 0.25
    ids = request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 3])
    ids.contents.int64_contents.extend([0, 1, 4])
    ids.parameters["binary_data_size"].int64_param = 24
    request.outputs.add(name="logits").parameters["classification"].int64_param = 0
    raw = pb("ModelInferRequest")(model_name="charrnn", raw_input_contents=[b"\x01" * 24, b"\x00" * 20])
    raw.inputs.add(name="input_ids", datatype="INT64", shape=[1, 3])
    raw.inputs.add(name="state_in", datatype="FP32", shape=[1, 1, 5])
    response = pb("ModelInferResponse")(model_name="charrnn", model_version="1", id="req-1",
                                        raw_output_contents=[b"\x00\x00\x80\x3f" * 15])
    response.outputs.add(name="logits", datatype="FP32", shape=[1, 3, 5])
    typed = pb("ModelInferResponse")(model_name="charrnn")
    typed.outputs.add(name="logits", datatype="FP32", shape=[1, 1, 2]).contents.fp32_contents.extend([0.5, -1.0])
    metadata = pb("ModelMetadataResponse")(name="charrnn", versions=["1"], platform="onnxruntime_onnx")
    metadata.inputs.add(name="input_ids", datatype="INT64", shape=[-1, -1])
    config = pb("ModelConfigResponse")()
    text_format.Parse(config_pbtxt(TritonModel("charrnn", vocab_size=65, num_layers=2, state_size=256)),
                      config.config)  # our partial ModelConfig holds all of the exported configuration
    messages = [
        request, raw, response, typed, metadata, config,
        pb("ModelStreamInferResponse")(error_message="input_ids: id 7 is outside the vocabulary of 5"),
        pb("ModelStreamInferResponse")(infer_response=response),
        pb("ServerLiveResponse")(live=True), pb("ServerReadyResponse")(ready=True),
        pb("ModelReadyRequest")(name="charrnn", version="1"), pb("ModelReadyResponse")(ready=True),
        pb("ServerMetadataResponse")(name="charrnn", version="0.1.0", extensions=["sequence"]),
        pb("ModelMetadataRequest")(name="charrnn"), pb("ModelConfigRequest")(name="charrnn", version="1"),
    ]
    answers = run_tritonside("wire.py", stdin=[
        {"type": m.DESCRIPTOR.full_name, "data": base64.b64encode(m.SerializeToString()).decode("ascii")}
        for m in messages])
    for sent, answer in zip(messages, answers, strict=True):
        name = sent.DESCRIPTOR.full_name
        # tritonclient reads exactly what we wrote (a field it did not know would be missing here) ...
        assert answer["json"] == json_format.MessageToDict(sent, preserving_proto_field_name=True), name
        # ... and what it writes reads back as the same message here.
        assert type(sent).FromString(base64.b64decode(answer["data"])) == sent, name
