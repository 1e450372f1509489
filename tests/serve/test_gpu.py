"""The CUDA path (IOBinding, device-resident state) against the CPU path, and the gpu_check tool's own
comparison.

The `gpu` tests run only where onnxruntime offers CUDAExecutionProvider (onnxruntime-gpu and a GPU, as
in the GPU image); elsewhere they skip, saying what the installed build offers. The others run
anywhere and check that the tool's comparison can tell two different models apart, so a dry run on
CPU that says OK means something.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from serve.engine.runtime import CUDA, Runtime
from serve.tools.gpu_check import TOLERANCE, engine_streams, logit_errors
from support import run_stage

AVAILABLE = ort.get_available_providers()
NO_CUDA = pytest.mark.skipif(
    CUDA not in AVAILABLE, reason=f"needs onnxruntime-gpu and a GPU: this onnxruntime offers {', '.join(AVAILABLE)}")


def perturbed(model: Path, out: Path, scale: float = 0.01) -> Path:
    """The same model, metadata and shapes with every float weight nudged: what a wrong device path
    looks like from the outside (logits off by about `scale`)."""
    proto = onnx.load(model)
    rng = np.random.default_rng(0)
    for tensor in proto.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32:
            noisy = weights + scale * rng.standard_normal(weights.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    onnx.save(proto, out)
    return out


def test_the_logit_comparison_passes_the_same_model_and_fails_another(text_model, tmp_path):
    cpu = Runtime(text_model, "cpu")
    same = logit_errors(Runtime(text_model, "cpu"), cpu)
    assert max(same.values()) < 1e-5, same  # two sessions over one file: a chain of steps is the prefill
    other = logit_errors(Runtime(perturbed(text_model, tmp_path / "other.onnx"), "cpu"), cpu)
    assert set(other) == set(same)
    assert min(other.values()) > TOLERANCE, other  # every path's comparison sees the difference


def test_the_check_script_dry_runs_on_cpu(text_model):
    proc = run_stage("serve.gpu_check", "--model", str(text_model), "--steps", "5", "--device", "cpu",
                     "--streams", "64", "--chars", "10")
    assert "OK" in proc.stdout and "batch 256" in proc.stdout
    assert "engine, 64 streams x 10 chars on the cpu path:" in proc.stdout
    # two CPU sessions over the same weights: every seeded stream must agree
    assert "engine: 64 of 64 seeded streams gave the same text on both paths" in proc.stdout


@pytest.mark.gpu
@NO_CUDA
def test_cuda_logits_match_cpu_on_every_path(text_model):
    cuda, cpu = Runtime(text_model, "cuda"), Runtime(text_model, "cpu")
    assert cuda.provider == CUDA  # not a silent fall-back to the CPU
    errors = logit_errors(cuda, cpu)
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.gpu
@NO_CUDA
def test_cuda_engine_streams_match_cpu(text_model):
    """64 seeded streams through the engine with its batch state on the device, then on the CPU: a draw
    can fall between the two devices' last-bit differences and part the texts, but rarely."""
    cuda, cpu = Runtime(text_model, "cuda"), Runtime(text_model, "cpu")
    _, on_cuda = asyncio.run(engine_streams(cuda, 64, 100))
    _, on_cpu = asyncio.run(engine_streams(cpu, 64, 100))
    assert all(len(t) == 100 for t in on_cuda + on_cpu)
    same = sum(a == b for a, b in zip(on_cuda, on_cpu))
    assert same >= 58, f"only {same} of 64 seeded streams gave the same text on CUDA and CPU"


@pytest.mark.gpu
@NO_CUDA
def test_gpu_check_passes_on_cuda(text_model):
    proc = run_stage("serve.gpu_check", "--model", str(text_model), "--steps", "20", "--streams", "64",
                     "--chars", "50", timeout=300)
    assert f"{CUDA} vs CPUExecutionProvider" in proc.stdout and proc.stdout.rstrip().endswith("OK"), proc.stdout
