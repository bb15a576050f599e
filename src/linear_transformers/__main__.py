"""python -m linear_transformers: the linear-transformers command."""

import sys

from .cli import main

sys.exit(main())
