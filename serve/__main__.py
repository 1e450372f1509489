"""python -m serve --model runs/demo/model.onnx [--host 0.0.0.0 --port 50051 --device auto --workers 2]"""

from __future__ import annotations

import logging
import sys

from serve.ops.server import run
from serve.ops.settings import parse
from serve.ops.workers import run_workers


def main() -> int:
    settings = parse()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_workers(settings) if settings.workers > 1 else run(settings)


if __name__ == "__main__":
    sys.exit(main())
