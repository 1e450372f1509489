"""`python -m serve.client`: the reference client; the code is in serve/tools/client.py."""

import sys

from serve.tools.client import main

if __name__ == "__main__":
    sys.exit(main())
