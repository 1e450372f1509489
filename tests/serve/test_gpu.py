"""The CUDA path (IOBinding, device-resident state); runs only where onnxruntime offers CUDA."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from support import run_stage

NO_CUDA = "CUDAExecutionProvider" not in ort.get_available_providers()


def test_the_check_script_runs_on_cpu(text_model):
    proc = run_stage("serve.gpu_check", "--model", str(text_model), "--steps", "5", "--device", "cpu",
                     "--chars", "10")
    assert "OK" in proc.stdout and "batch 256" in proc.stdout
    assert "engine, 256 streams x 10 chars on the cpu path:" in proc.stdout
    # two CPU sessions over the same weights: every seeded stream must agree
    assert "engine: 256 of 256 seeded streams gave the same text on both paths" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_gpu_check_passes(text_model):
    proc = run_stage("serve.gpu_check", "--model", str(text_model), "--steps", "20", timeout=300)
    assert "OK" in proc.stdout
