"""onnxruntime on the model file itself, and readers of tritonside results: shared by the KServe tests of
both bindings (tests/serve/test_kserve.py, tests/serve/test_http_kserve.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def random_inputs(reference: Reference) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded ids and states for the explicit-state comparisons: one row of 9 ids, and a batch of 4 x 6."""
    rng = np.random.default_rng(5)
    vocab = len(reference.vocab)
    ids = rng.integers(0, vocab, size=(1, 9))
    state = rng.normal(size=(1, *reference.state_shape)).astype(np.float32)
    batch_ids = rng.integers(0, vocab, size=(4, 6))
    batch_state = rng.normal(size=(4, *reference.state_shape)).astype(np.float32)
    return ids, state, batch_ids, batch_state


class Reference:
    """onnxruntime on the model file itself: what every ModelInfer must agree with."""

    def __init__(self, model: Path) -> None:
        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.meta = meta
        self.vocab = "".join(json.loads(meta["vocab"]))
        self.state_shape = (int(meta["num_layers"]), int(meta["state_size"]))

    def run(self, ids: np.ndarray, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if state is None:
            state = np.zeros((len(ids), *self.state_shape), dtype=np.float32)
        logits, state_out = self.session.run(["logits", "state_out"],
                                             {"input_ids": ids.astype(np.int64), "state_in": state})
        return logits, state_out

    def hidden(self, ids: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """The file's `hidden` output: [batch, seq, num_layers, hidden_size]."""
        if state is None:
            state = np.zeros((len(ids), *self.state_shape), dtype=np.float32)
        (hidden,) = self.session.run(["hidden"], {"input_ids": ids.astype(np.int64), "state_in": state})
        return hidden

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def ids(self, text: str) -> list[int]:
        return [self.vocab.index(c) for c in text]


def _array(output: dict) -> np.ndarray:
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def _argmax(result: dict, vocab: str) -> str:
    return "".join(vocab[i] for i in _array(result["outputs"]["logits"])[0].argmax(-1))
