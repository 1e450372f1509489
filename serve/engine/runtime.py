"""The onnxruntime session: provider choice, the ONNX contract check at load, and the two calls.

The contract (written by export/): inputs `input_ids` int64 [batch, seq] and `state_in` float32
[batch, num_layers, state_size]; outputs `logits` float32 [batch, seq, vocab] and `state_out` float32
[batch, num_layers, state_size], and optionally `hidden` float32 [batch, seq, num_layers, hidden_size]
(every layer's h after every character; files exported before it lack it and still serve, without the
routes that show it); metadata `vocab` (JSON list of characters), `cell`, `num_layers`,
`hidden_size`, `state_size`, plus optional provenance strings. A file that breaks it, or whose test call
gives a NaN or an infinity, fails at start-up with ModelError naming the file, never on the first request.

On CUDA the step batch's state stays on the device between steps (IOBinding); only logits come back.
Generate never fetches `hidden` (onnxruntime computes it anyway: bench/hidden.py measures that cost).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serve.errors import DeviceError, ModelError

log = logging.getLogger(__name__)

CELLS = ("rnn", "gru", "lstm")
PROVENANCE = ("corpus", "steps", "val_loss", "torch_version", "exported_at", "producer")
_INPUTS = {"input_ids": ("tensor(int64)", 2), "state_in": ("tensor(float)", 3)}
_OUTPUTS = {"logits": ("tensor(float)", 3), "state_out": ("tensor(float)", 3)}
HIDDEN = "hidden"
_OPTIONAL = {HIDDEN: ("tensor(float)", 4)}
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@dataclass(frozen=True)
class ModelSpec:
    """What the server knows about a model: all of it read from the .onnx file."""

    path: str
    sha256: str
    vocab: tuple[str, ...]
    cell: str
    num_layers: int
    hidden_size: int
    state_size: int
    provenance: dict[str, str] = field(default_factory=dict)
    has_hidden: bool = False  # the file has the optional `hidden` output

    @property
    def state_shape(self) -> tuple[int, int]:
        return (self.num_layers, self.state_size)


def _positive_int(meta: dict[str, str], key: str, path: str) -> int:
    raw = meta[key]
    # ASCII digits only: '²'.isdigit() is True yet int('²') raises, and int('٢') is 2 from Arabic-Indic digits
    if not (raw.isascii() and raw.isdecimal()) or int(raw) <= 0:
        raise ModelError(path, f"metadata {key!r} must be a positive decimal integer, got {raw!r}")
    return int(raw)


def parse_metadata(meta: dict[str, str], path: str, sha256: str) -> ModelSpec:
    """Checks the contract's metadata_props and builds the ModelSpec."""
    missing = [k for k in ("vocab", "cell", "num_layers", "hidden_size", "state_size") if k not in meta]
    if missing:
        raise ModelError(path, f"missing metadata {', '.join(missing)} (not a charrnn export?)")
    try:
        vocab = json.loads(meta["vocab"])
    except json.JSONDecodeError as error:
        raise ModelError(path, f"metadata 'vocab' is not JSON: {error}") from None
    if not isinstance(vocab, list) or not vocab:
        raise ModelError(path, "metadata 'vocab' must be a non-empty JSON list")
    if not all(isinstance(c, str) and len(c) == 1 for c in vocab):
        raise ModelError(path, "metadata 'vocab' must hold single-character strings")
    if len(set(vocab)) != len(vocab):
        raise ModelError(path, "metadata 'vocab' has repeated characters")
    cell = meta["cell"]
    if cell not in CELLS:
        raise ModelError(path, f"metadata 'cell' must be one of {', '.join(CELLS)}, got {cell!r}")
    layers = _positive_int(meta, "num_layers", path)
    hidden = _positive_int(meta, "hidden_size", path)
    state = _positive_int(meta, "state_size", path)
    want = 2 * hidden if cell == "lstm" else hidden
    if state != want:
        raise ModelError(path, f"metadata state_size {state} does not match {cell} with hidden_size {hidden}"
                               f" (expected {want})")
    provenance = {k: meta[k] for k in PROVENANCE if k in meta}
    return ModelSpec(path, sha256, tuple(vocab), cell, layers, hidden, state, provenance)


def choose_providers(device: str) -> list[str]:
    """Provider list for --device: auto takes CUDA when this onnxruntime build offers it."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise DeviceError(
                f"--device cuda: this onnxruntime build offers no {CUDA} (available: {', '.join(available)}); "
                "install onnxruntime-gpu (requirements/serve-gpu.txt) or use --device cpu")
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise DeviceError(f"unknown device {device!r} (auto, cpu or cuda)")


def _check_signature(session: ort.InferenceSession, spec: ModelSpec) -> bool:
    """Checks the graph's interface against the contract and the metadata; True if it has `hidden`."""
    outputs = {n.name for n in session.get_outputs()}
    optional = {name: want for name, want in _OPTIONAL.items() if name in outputs}
    for kind, nodes, expected in (("input", session.get_inputs(), _INPUTS),
                                  ("output", session.get_outputs(), {**_OUTPUTS, **optional})):
        found = {n.name: n for n in nodes}
        if kind == "input" and set(found) != set(expected):
            raise ModelError(spec.path, f"inputs are {sorted(found)}, expected {sorted(expected)}")
        for name, (dtype, rank) in expected.items():
            if name not in found:
                raise ModelError(spec.path, f"no {kind} named {name!r} (has {sorted(found)})")
            node = found[name]
            if node.type != dtype or len(node.shape) != rank:
                raise ModelError(spec.path, f"{kind} {name!r} is {node.type} rank {len(node.shape)}, "
                                            f"expected {dtype} rank {rank}")
    static: dict[str, tuple[int | None, ...]] = {
        "state_in": (None, spec.num_layers, spec.state_size),
        "state_out": (None, spec.num_layers, spec.state_size),
        "logits": (None, None, len(spec.vocab)),
    }
    if optional:
        static[HIDDEN] = (None, None, spec.num_layers, spec.hidden_size)
    nodes = {n.name: n for n in [*session.get_inputs(), *session.get_outputs()]}
    for name, dims in static.items():
        for axis, (want, got) in enumerate(zip(dims, nodes[name].shape, strict=True)):
            if want is not None and isinstance(got, int) and got != want:
                raise ModelError(spec.path, f"{name} dimension {axis} is {got}, metadata says {want}")
    return bool(optional)


def read_model(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ModelError(str(path), f"cannot read model file: {error.strerror or error}") from None


class Runtime:
    """One onnxruntime session over one model file, called from a single worker thread.

    data: the file's bytes when the caller read them already (an engine process restarted by the server
    loads the bytes the server read at start, whatever the file holds by then); path names the model."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 1, data: bytes | None = None) -> None:
        path = str(path)
        if data is None:
            data = read_model(path)
        sha256 = hashlib.sha256(data).hexdigest()
        providers = choose_providers(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(path, f"not a loadable ONNX model: {first}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.spec = parse_metadata(dict(meta), path, sha256)
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise DeviceError(f"--device cuda: onnxruntime fell back to {self.provider}")
        if _check_signature(self.session, self.spec):
            self.spec = dataclasses.replace(self.spec, has_hidden=True)
        self._on_cuda = self.provider == CUDA
        self._test_call()

    def _test_call(self) -> None:
        """One real call: dimensions the graph leaves symbolic must still agree with the metadata, and
        every output must be finite (a NaN would be sampled as token 0 forever). Each character of the
        vocabulary is fed once, so damage to one character's weights is caught too."""
        vocab = len(self.spec.vocab)
        seq = max(3, vocab)  # batch 2 != seq, so the two dimensions cannot be confused
        ids = np.stack([np.arange(seq) % vocab, np.arange(seq)[::-1] % vocab]).astype(np.int64)
        hidden_shape = (2, seq, self.spec.num_layers, self.spec.hidden_size)
        try:
            if self.spec.has_hidden:
                logits, state, hidden = self.run_hidden(ids, self.zero_state(2))
            else:
                (logits, state), hidden = self.run(ids, self.zero_state(2)), np.zeros(hidden_shape, np.float32)
        except Exception as error:  # noqa: BLE001 - any failure here means the file is unusable
            raise ModelError(self.spec.path, f"test run failed: {str(error).splitlines()[0]}") from None
        want_logits = (2, seq, vocab)
        want_state = (2, *self.spec.state_shape)
        if logits.shape != want_logits or state.shape != want_state:
            raise ModelError(self.spec.path, f"test run gave logits {logits.shape} and state_out {state.shape}, "
                                             f"expected {want_logits} and {want_state}")
        if hidden.shape != hidden_shape:
            raise ModelError(self.spec.path, f"test run gave hidden {hidden.shape}, expected {hidden_shape}")
        outputs = (("logits", logits), ("state_out", state), (HIDDEN, hidden))
        bad = {name: (int(values.size - np.isfinite(values).sum()), values.size) for name, values in outputs}
        if any(n for n, _ in bad.values()):
            found = " and ".join(f"{n} of {size} {name} values" for name, (n, size) in bad.items() if n)
            raise ModelError(self.spec.path, f"test run gave non-finite outputs (NaN or infinity): {found}; "
                                             "the weights are damaged or training diverged")

    def zero_state(self, batch: int) -> np.ndarray:
        return np.zeros((batch, *self.spec.state_shape), dtype=np.float32)

    def run(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feeds ids [batch, seq] from host state; returns host logits [batch, seq, V] and state_out."""
        logits, state_out = self.session.run(("logits", "state_out"), {"input_ids": ids, "state_in": state})
        return logits, state_out

    def run_hidden(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """run's outputs and hidden [batch, seq, num_layers, hidden_size]; only for a file that has it."""
        assert self.spec.has_hidden, "the model file has no hidden output"
        logits, state_out, hidden = self.session.run(("logits", "state_out", HIDDEN),
                                                     {"input_ids": ids, "state_in": state})
        return logits, state_out, hidden

    # The step batch's state lives in a "device state": a numpy array on CPU, an OrtValue on CUDA.
    def upload(self, state: np.ndarray) -> Any:
        if self._on_cuda:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(state), "cuda", 0)
        return state

    def download(self, state: Any) -> np.ndarray:
        host: np.ndarray = state.numpy() if self._on_cuda else state
        return host

    def step(self, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """One character per row: ids [batch, 1]; returns host logits [batch, V] and the device state."""
        if not self._on_cuda:
            logits, state_out = self.run(ids, state)
            return logits[:, -1, :], state_out
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_ortvalue_input("state_in", state)
        binding.bind_output("logits", "cpu")
        binding.bind_output("state_out", "cuda", 0)
        self.session.run_with_iobinding(binding)
        logits, state_out = binding.get_outputs()
        return logits.numpy()[:, -1, :], state_out
