"""``python -m pipeline.report``: see :mod:`pipeline.report`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
