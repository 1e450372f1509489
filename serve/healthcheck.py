"""`python -m serve.healthcheck`: the health probe that containers run; the code is in serve/tools/healthcheck.py."""

import sys

from serve.tools.healthcheck import main

if __name__ == "__main__":
    sys.exit(main())
