"""python -m serve --model runs/demo/model.onnx [--host 0.0.0.0 --port 50051 --device auto]"""

from __future__ import annotations

import asyncio
import logging
import sys

from serve.errors import ConfigError, DeviceError, ModelError
from serve.server import serve
from serve.settings import parse


def main() -> int:
    settings = parse()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except (ModelError, ConfigError) as error:  # its message starts with the file's path or the flag
        print(f"charrnn serve: {error}", file=sys.stderr, flush=True)
        return 2
    except (DeviceError, OSError) as error:
        print(f"charrnn serve: cannot serve {settings.model}: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
