"""GPU check: the CUDA path gives the CPU path's numbers and keeps batch state on the device.

    python -m serve.gpu_check --model runs/demo/model.onnx      # needs onnxruntime-gpu and a GPU

Exits non-zero when CUDAExecutionProvider is missing or results differ from CPU beyond tolerance.
Prints step latency at batch 1, 64 and 256 (state bound on the device between steps).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from serve.errors import DeviceError, ModelError
from serve.runtime import Runtime


def _chain(rt: Runtime, ids: np.ndarray) -> np.ndarray:
    """Steps ids [batch, T] one column at a time with device-resident state; returns logits [batch, T, V]."""
    state = rt.upload(rt.zero_state(ids.shape[0]))
    out = []
    for t in range(ids.shape[1]):
        logits, state = rt.step(ids[:, t:t + 1], state)
        out.append(logits)
    return np.stack(out, axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=200, help="timed steps per batch size")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: dry-run the checks on CPU")
    args = p.parse_args(argv)
    try:
        gpu, cpu = Runtime(args.model, args.device), Runtime(args.model, "cpu")
    except (DeviceError, ModelError) as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    print(f"{args.model}: {gpu.provider} vs {cpu.provider}")
    vocab = len(gpu.spec.vocab)
    ids = np.random.default_rng(0).integers(0, vocab, size=(8, 32), dtype=np.int64)
    want, _ = cpu.run(ids, cpu.zero_state(8))
    got_prefill, _ = gpu.run(ids, gpu.zero_state(8))
    got_chain = _chain(gpu, ids)
    # membership change mid-chain: download, drop a row, upload, continue
    state = gpu.upload(gpu.zero_state(8))
    for t in range(16):
        _, state = gpu.step(ids[:, t:t + 1], state)
    kept = gpu.upload(gpu.download(state)[1:])
    tail = []
    for t in range(16, 32):
        logits, kept = gpu.step(ids[1:, t:t + 1], kept)
        tail.append(logits)
    errors = {"prefill": np.abs(got_prefill - want).max(), "device-state chain": np.abs(got_chain - want).max(),
              "after re-batching": np.abs(np.stack(tail, axis=1) - want[1:, 16:]).max()}
    for name, err in errors.items():
        print(f"{name:>20}: max |cuda - cpu| logits = {err:.2e}")
    for batch in (1, 64, 256):
        step_ids = np.zeros((batch, 1), dtype=np.int64)
        state = gpu.upload(gpu.zero_state(batch))
        for _ in range(10):
            _, state = gpu.step(step_ids, state)
        start = time.perf_counter()
        for _ in range(args.steps):
            _, state = gpu.step(step_ids, state)
        seconds = (time.perf_counter() - start) / args.steps
        print(f"batch {batch:>3}: {seconds * 1e6:8.1f} us/step  {batch / seconds:10.0f} chars/s (model only)")
    ok = all(err < 1e-3 for err in errors.values())
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
