"""`python -m serve.gpu_check`: the CUDA-against-CPU check; the code is in serve/tools/gpu_check.py."""

import sys

from serve.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
