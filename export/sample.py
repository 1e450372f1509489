"""Sample text from model.onnx with onnxruntime and numpy alone, knowing only the ONNX contract.

    python -m export.sample runs/demo/model.onnx --prompt "The " --chars 400

The smallest complete client of the contract: read the vocabulary from metadata_props, feed the prompt
in one call from the zero state, then one character per call with state_out fed back as state_in.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

import numpy as np
import onnxruntime as ort


def sample(path: str, prompt: str, chars: int, temperature: float, seed: int, out: TextIO = sys.stdout) -> str:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    vocab = json.loads(meta["vocab"])
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(prompt) - set(index))
    if unknown:
        raise SystemExit(f"export.sample: prompt characters not in the vocabulary: {unknown}")
    if not prompt:
        raise SystemExit("export.sample: --prompt must hold at least one character")
    rng = np.random.default_rng(seed)
    state = np.zeros((1, int(meta["num_layers"]), int(meta["state_size"])), dtype=np.float32)
    ids = np.array([[index[ch] for ch in prompt]], dtype=np.int64)
    produced = []
    out.write(prompt)
    for _ in range(chars):
        logits, state = sess.run(["logits", "state_out"], {"input_ids": ids, "state_in": state})
        z = logits[0, -1].astype(np.float64) / max(temperature, 1e-6)
        p = np.exp(z - z.max())
        nxt = int(rng.choice(len(vocab), p=p / p.sum()))
        produced.append(vocab[nxt])
        out.write(vocab[nxt])
        out.flush()
        ids = np.array([[nxt]], dtype=np.int64)
    out.write("\n")
    return "".join(produced)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="path to model.onnx")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sample(args.model, args.prompt, args.chars, args.temperature, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
