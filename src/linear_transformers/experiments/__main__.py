"""python -m linear_transformers.experiments <experiment> [options]"""

from __future__ import annotations

import sys

from ..commands import dispatch
from . import copy, image, speech

EXPERIMENTS = {"copy": copy, "image": image, "speech": speech}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m linear_transformers.experiments", __doc__, EXPERIMENTS, argv)


if __name__ == "__main__":
    sys.exit(main())
