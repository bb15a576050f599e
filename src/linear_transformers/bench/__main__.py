"""python -m linear_transformers.bench <benchmark> [options]"""

from __future__ import annotations

import sys

from .. import commands
from . import attention, dispatch, generate, gpu, hf, linearized, threads

BENCHMARKS = {
    "attention": attention,
    "dispatch": dispatch,
    "generate": generate,
    "gpu": gpu,
    "hf": hf,
    "linearized": linearized,
    "threads": threads,
}


def main(argv: list[str] | None = None) -> int:
    return commands.dispatch("python -m linear_transformers.bench", __doc__, BENCHMARKS, argv)


if __name__ == "__main__":
    sys.exit(main())
