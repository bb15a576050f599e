"""python -m linear_transformers.experiments <name> [options] (the same as linear-transformers experiment <name>)"""

from __future__ import annotations

import sys

from .. import commands


def main(argv: list[str] | None = None) -> int:
    return commands.dispatch("python -m linear_transformers.experiments", argv, commands.EXPERIMENTS)


if __name__ == "__main__":
    sys.exit(main())
