"""`python -m llada_kernels ...` is the `llada-kernels` console script."""

import sys

from .cli import main

sys.exit(main())
