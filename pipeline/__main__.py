"""``python -m pipeline``: the same program as the ``wsipipe`` console script (see :mod:`pipeline.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
