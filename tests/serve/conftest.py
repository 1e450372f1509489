"""Real servers on 127.0.0.1 port 0 (tests/live.py), shared per session or module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kserve_reference import Reference
from live import LiveServer, serve_model


@pytest.fixture(scope="session")
def hihell_model(hihell_run: Path) -> Path:
    return hihell_run / "model.onnx"


@pytest.fixture(scope="session")
def text_model(text_runs: dict[str, Path]) -> Path:
    """A GRU 2x32 trained a few steps on the tiny corpus: its samples vary, unlike hihell's."""
    return text_runs["gru"] / "model.onnx"


@pytest.fixture(scope="session")
def hihell_server(hihell_model: Path) -> Iterator[LiveServer]:
    yield from serve_model(hihell_model, max_chars=1000)


@pytest.fixture(scope="session")
def text_server(text_model: Path) -> Iterator[LiveServer]:
    yield from serve_model(text_model, max_chars=1000)


@pytest.fixture(scope="session")
def unbatched_server(text_model: Path) -> Iterator[LiveServer]:
    yield from serve_model(text_model, max_chars=1000, max_batch=1)


@pytest.fixture(scope="module")
def lstm_server(text_runs: dict[str, Path]) -> Iterator[LiveServer]:
    """state_size = 2 * hidden_size: the codec and the engine must not assume hidden_size."""
    yield from serve_model(text_runs["lstm"] / "model.onnx")


@pytest.fixture(scope="module")
def hihell(hihell_model: Path) -> Reference:
    """onnxruntime on the lesson's model file: what both KServe bindings' answers must agree with."""
    return Reference(hihell_model)


@pytest.fixture(scope="module")
def text(text_model: Path) -> Reference:
    return Reference(text_model)
