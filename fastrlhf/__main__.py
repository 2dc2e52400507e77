"""``python -m fastrlhf ...``: the same command line as the ``fastrlhf`` script."""

import sys

from fastrlhf.cli import main

sys.exit(main())
