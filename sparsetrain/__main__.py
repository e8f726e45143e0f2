"""``python -m sparsetrain``: the same command line as ``sparsetrain``."""

import sys

from .cli import main

sys.exit(main())
