"""The real server with its per-step model call skipped: for attributing time, never for serving.

    python bench/model_skipped.py --model model.onnx [any `python -m serve` flag]

Everything runs as in `python -m serve` (gRPC, the engine process or thread, batching, sampling,
delivery) except that a step call returns the logits of the first real call of the same batch size and
leaves the state as it was, after releasing the GIL once as onnxruntime does. The text is meaningless;
the chars/s it serves, next to the real server's and the ceiling's, splits what the server adds per
character into the model's compute and everything else.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import ENGINE_CHILD  # how this script starts itself as the engine process

from serve.engine import runtime
from serve.process import child, proxy

_real_step = runtime.Runtime.step
_first: dict[int, np.ndarray] = {}


def _skipped_step(self: runtime.Runtime, ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
    rows = len(ids)
    if rows not in _first:
        _first[rows] = _real_step(self, ids, state)[0]
    time.sleep(0)  # onnxruntime releases the GIL while it computes; let other threads in the same way
    return _first[rows], state


if __name__ == "__main__":
    runtime.Runtime.step = _skipped_step  # covers --engine thread too
    if sys.argv[1:2] == [ENGINE_CHILD]:
        sys.exit(child.main(sys.argv[2:]))
    proxy.CHILD = [sys.executable, __file__, ENGINE_CHILD]
    from serve.__main__ import main

    sys.exit(main())
