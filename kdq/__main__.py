"""``python -m kdq`` is the ``kdq`` command."""

import sys

from .cli import main

sys.exit(main())
