"""The committed stubs are what `make protos` generates, and the proto keeps the issue's names."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve.api.pb.charrnn.v1 import charrnn_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
GENERATED = tuple(f"{folder}/{stem}{suffix}" for folder, stem in (("charrnn/v1", "charrnn"),
                                                                  ("inference", "grpc_service"))
                  for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_stubs_regenerate_identically(tmp_path):
    subprocess.run(["make", "-s", "protos", f"BIN={Path(sys.executable).parent}", f"PROTO_OUT={tmp_path}"],
                   cwd=ROOT, check=True, capture_output=True)
    for name in GENERATED:
        fresh = tmp_path / "serve/api/pb" / name
        assert fresh.read_text() == (ROOT / "serve/api/pb" / name).read_text(), f"{name} is stale: make protos"


def test_generated_imports_are_package_qualified():
    text = (ROOT / "serve/api/pb/charrnn/v1/charrnn_pb2_grpc.py").read_text()
    assert "from serve.api.pb.charrnn.v1 import charrnn_pb2" in text
    text = (ROOT / "serve/api/pb/inference/grpc_service_pb2_grpc.py").read_text()
    assert "from serve.api.pb.inference import grpc_service_pb2" in text


def _fields(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_the_fixed_names_and_numbers():
    service = pb.DESCRIPTOR.services_by_name["CharRNN"]
    assert service.full_name == "charrnn.v1.CharRNN"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
               for m in service.methods}
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "Predict": ("PredictRequest", "PredictResponse", True, True),
        "Step": ("StepRequest", "StepResponse", False, False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False, False),
    }
    assert _fields(pb.GenerateRequest) == dict(prompt=1, max_chars=2, temperature=3, top_k=4, top_p=5, seed=6,
                                               stop=7)
    assert _fields(pb.GenerateResponse) == dict(text=1, index=2, logprob=3, finish_reason=4)
    assert _fields(pb.PredictRequest) == dict(text=1, top_k=2, hidden=3)
    assert _fields(pb.PredictResponse) == dict(input=1, next=2, probability=3, top=4, hidden=5)
    assert _fields(pb.Candidate) == dict(text=1, probability=2)
    assert _fields(pb.StepRequest) == dict(state=1, text=2, top_k=3)
    assert _fields(pb.StepResponse) == dict(state=1, next=2, probability=3, top=4)
    assert _fields(pb.ModelInfo)["vocab"] == 1
    assert _fields(pb.ModelInfo)["project_version"] == 15
    assert {"cell", "num_layers", "hidden_size", "state_size", "execution_provider", "model_sha256"} <= set(
        _fields(pb.ModelInfo))
    assert dict(pb.FinishReason.items()) == dict(FINISH_REASON_UNSPECIFIED=0, FINISH_REASON_LENGTH=1,
                                                 FINISH_REASON_STOP=2)
    optional = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields if f.has_presence}
    assert optional == {"temperature", "top_p", "seed"}


def test_every_rpc_and_field_is_commented():
    lines = (ROOT / "protos/charrnn/v1/charrnn.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        declares = stripped.startswith("rpc ") or (stripped.endswith(";") and "=" in stripped
                                                    and not stripped.startswith(("syntax", "//")))
        if declares:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} is not commented: {stripped}"
