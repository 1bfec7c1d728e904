"""`python -m vit ...`: the same command line as `vit ...` and `python main.py ...`."""

import sys

from vit.cli import main

sys.exit(main())
