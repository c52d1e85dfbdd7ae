"""`python -m qnnjit ...` is the `qnnjit` command."""

import sys

from .cli import main

sys.exit(main())
