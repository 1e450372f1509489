"""clients/triton/example.py, the tritonclient program written from Triton's documentation alone, run
in .venv-triton against a real server on port 0 as a user runs it: metadata, explicit state, and a
sequence over the hihell model, each giving 'ihello'."""

from __future__ import annotations

import json
import subprocess

import onnxruntime as ort
from support import ROOT
from tritonenv import triton_python


def test_the_triton_example_runs_against_charrnn(hihell_server, hihell_model):
    meta = ort.InferenceSession(str(hihell_model), providers=["CPUExecutionProvider"]).get_modelmeta()
    vocab = meta.custom_metadata_map["vocab"]
    layers, size = meta.custom_metadata_map["num_layers"], meta.custom_metadata_map["state_size"]
    proc = subprocess.run([str(triton_python()), "clients/triton/example.py", "--url", hihell_server.target,
                           "--vocab", vocab, "--text", "hihell"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "model charrnn versions ['1'] platform onnxruntime_onnx"
    assert f"  state_in FP32 [-1, {layers}, {size}]" in lines and len(json.loads(vocab)) == 5
    results = [line.split()[-1] for line in lines if "char by char" in line or "whole text" in line]
    assert results == ["ihello"] * 3, proc.stdout
