"""GPU check: the CUDA path gives the CPU path's numbers and keeps batch state on the device.

    python -m serve.gpu_check --model runs/demo/model.onnx      # needs onnxruntime-gpu and a GPU

Exits non-zero when CUDAExecutionProvider is missing, results differ from CPU beyond tolerance, or
the engine run fails. Prints step latency at batch 1, 64 and 256 (state bound on the device between
steps), then runs --streams seeded Generate streams through the engine itself (the batcher, with its
step batch's state on the device) and prints their chars/s, next to the same streams on the CPU path.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np

from serve.engine.protocol import SamplingParams
from serve.errors import DeviceError, ModelError, ServeError
from serve.engine.runtime import Runtime
from serve.engine.thread import ThreadEngine


TOLERANCE = 1e-3  # max |device - cpu| logits; float32 kernels on two devices differ near 1e-6


def _chain(rt: Runtime, ids: np.ndarray) -> np.ndarray:
    """Steps ids [batch, T] one column at a time with device-resident state; returns logits [batch, T, V]."""
    state = rt.upload(rt.zero_state(ids.shape[0]))
    out = []
    for t in range(ids.shape[1]):
        logits, state = rt.step(ids[:, t:t + 1], state)
        out.append(logits)
    return np.stack(out, axis=1)


def logit_errors(device: Runtime, cpu: Runtime) -> dict[str, float]:
    """Max |device - cpu| logits over 8 seeded texts of 32 characters, for each way the server runs the
    model: a prefill, a chain of steps with the state left on the device, and a chain whose batch loses a
    row half-way (download, drop, upload, continue)."""
    ids = np.random.default_rng(0).integers(0, len(cpu.spec.vocab), size=(8, 32), dtype=np.int64)
    want, _ = cpu.run(ids, cpu.zero_state(8))
    got_prefill, _ = device.run(ids, device.zero_state(8))
    got_chain = _chain(device, ids)
    state = device.upload(device.zero_state(8))
    for t in range(16):
        _, state = device.step(ids[:, t:t + 1], state)
    kept = device.upload(device.download(state)[1:])
    tail = []
    for t in range(16, 32):
        logits, kept = device.step(ids[1:, t:t + 1], kept)
        tail.append(logits)
    return {"prefill": float(np.abs(got_prefill - want).max()),
            "device-state chain": float(np.abs(got_chain - want).max()),
            "after re-batching": float(np.abs(np.stack(tail, axis=1) - want[1:, 16:]).max())}


async def engine_streams(rt: Runtime, streams: int, chars: int) -> tuple[float, list[list[int]]]:
    """streams seeded Generate streams of chars characters through a ThreadEngine on rt: (seconds, tokens)."""
    engine = ThreadEngine(rt, max_batch=max(streams, 1))
    engine.start(asyncio.get_running_loop())
    failures: list[str] = []

    async def one(seed: int) -> list[int]:
        stream = engine.generate(np.zeros(1, dtype=np.int64), SamplingParams(0.8, 0, 1.0, seed), chars)
        tokens: list[int] = []
        try:
            async for token, _, _ in stream:
                tokens.append(token)
        except ServeError as error:  # reported as INCOMPLETE by the caller, with the first reason
            failures.append(str(error))
        return tokens

    try:
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(seed) for seed in range(streams)))
        seconds = time.perf_counter() - start
    finally:
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
    if failures:
        print(f"engine: {len(failures)} streams failed, the first with: {failures[0]}")
    return seconds, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=200, help="timed steps per batch size")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: dry-run the checks on CPU")
    p.add_argument("--streams", type=int, default=256, help="concurrent Generate streams in the engine run")
    p.add_argument("--chars", type=int, default=200, help="characters per stream in the engine run")
    args = p.parse_args(argv)
    try:
        gpu, cpu = Runtime(args.model, args.device), Runtime(args.model, "cpu")
    except (DeviceError, ModelError) as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    print(f"{args.model}: {gpu.provider} vs {cpu.provider}")
    errors = logit_errors(gpu, cpu)
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
    ok = all(err < TOLERANCE for err in errors.values())
    runs = []
    for name, rt in ((f"the {args.device} path", gpu), ("the cpu path (reference)", cpu)):
        seconds, tokens = asyncio.run(engine_streams(rt, args.streams, args.chars))
        complete = all(len(t) == args.chars for t in tokens)
        ok = ok and complete
        runs.append(tokens)
        rate = args.streams * args.chars / seconds
        print(f"engine, {args.streams} streams x {args.chars} chars on {name}: {rate:8.0f} chars/s "
              f"({seconds:.2f} s){'' if complete else ', INCOMPLETE'}")
    # Not a failure: a draw can land between CUDA's and the CPU's probabilities where they differ in the
    # last bits, and the texts part from there.
    first, second = runs
    same = sum(a == b for a, b in zip(first, second))
    print(f"engine: {same} of {args.streams} seeded streams gave the same text on both paths")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
