"""python -m linear_transformers.bench <benchmark> [options]"""

from __future__ import annotations

import argparse
import sys

from . import attention, generate, gpu

BENCHMARKS = {"attention": attention, "generate": generate, "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linear_transformers.bench", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(
            name,
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
    args = parser.parse_args(argv)
    return BENCHMARKS[args.benchmark].main(args)


if __name__ == "__main__":
    sys.exit(main())
