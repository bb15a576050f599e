"""Command-line plumbing shared by the `linear-transformers` command, the experiments, the
benchmarks and the demo: subcommands from modules, presets that fill in only what was not given.
(Kept below cli.py so that nothing imports the CLI itself.)"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .options import Parser


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options in argv (not those left at their defaults). Changes the
    parser's defaults: call it on a parser that has done its parsing."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def dispatch(prog: str, description: str, modules: dict, argv: list[str] | None) -> int:
    """A command whose subcommands are modules with `add_arguments(parser)`, `main(args)` and a docstring."""
    parser = Parser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="name", required=True)
    for name, module in modules.items():
        p = sub.add_parser(
            name,
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
    args = parser.parse_args(argv)
    # which options were given (presets such as --quick and --paper fill in only the others)
    rest = list(sys.argv[1:] if argv is None else argv)
    args.given = given_options(sub.choices[args.name], rest[rest.index(args.name) + 1 :])
    return modules[args.name].main(args)


def apply_preset(settings, preset: dict, given: set[str]):
    """`settings` (a dataclass) with the preset's values for the fields not given on the command line."""
    return dataclasses.replace(settings, **{k: v for k, v in preset.items() if k not in given})
