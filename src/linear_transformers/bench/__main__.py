"""python -m linear_transformers.bench <name> [options] (the same as linear-transformers bench <name>)"""

from __future__ import annotations

import sys

from .. import commands


def main(argv: list[str] | None = None) -> int:
    return commands.dispatch("python -m linear_transformers.bench", argv, commands.BENCHMARKS)


if __name__ == "__main__":
    sys.exit(main())
