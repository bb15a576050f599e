"""Command-line options from dataclasses: the one way the project is configured.

Every subcommand (train, sample, eval, export, web, demo, bench, experiment) keeps its settings in
a dataclass whose fields are declared with `option(default, help, choices=...)`: the default, the
help text and the allowed values live in the field's metadata, and `add_options` makes each field
an option (`--field-name`, typed from its annotation) with them. `from_args` builds the dataclass
back from the parsed options.

    @dataclass
    class Settings:
        steps: int = option(1000, "optimisation steps")
        methods: tuple[str, ...] = option(("softmax", "linear"), "which models", choices=METHODS)
        quick: bool = option(False, "a tiny run in seconds")

Types: int, float, str, bool (--x / --no-x), Path, `X | None` (default None), and tuples or lists
of one of those (one or more values). argparse does the parsing; a few lines here spare a
dependency, and the help stays next to the field it describes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

_SCALARS = {int: "INT", float: "FLOAT", str: "STR", Path: "PATH"}


def max_threads() -> int:
    """The most CPU threads any command accepts: 4 per core (more only slows a run down, and a huge
    count crashes PyTorch's thread pool)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(owner: str, value: int, name: str = "threads") -> None:
    """A thread count in [0, max_threads()] (0: torch's default), or a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_threads():
        raise ValueError(
            f"{owner}: {name} must be an int in [0, {max_threads()}] (0: torch's default; this machine has "
            f"{os.cpu_count()} cores), got {value!r}"
        )


def count(default, help: str, **kwargs):
    """An option that counts something (a size, a number of runs): at least 1."""
    return option(default, help, low=1, **kwargs)


def _at_least(kind: type, low: float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= max_threads():
        raise argparse.ArgumentTypeError(
            f"must be in [0, {max_threads()}] (this machine has {os.cpu_count()} cores), got {value}"
        )
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (with where to look), not the usage."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def option(default, help: str, *, choices=None, metavar: str | None = None, low: float | None = None):
    """A dataclass field that is also a command-line option; `low`: the least value the command line takes."""
    metadata = {"help": help, "choices": None if choices is None else list(choices), "metavar": metavar, "low": low}
    if isinstance(default, list):  # a mutable default: each instance gets its own copy
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _strip_none(annotation):
    """X from `X | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _kind(annotation) -> tuple[type, bool]:
    """(scalar type, several values) of a field's annotation."""
    annotation = _strip_none(annotation)
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """Every field of the dataclass `cls` (but `skip`) as an option, with its default and help."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with option(default, help) to make it an option")
        kind, several = _kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = meta["help"].replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if kind not in _SCALARS:
            raise TypeError(f"{cls.__name__}.{f.name}: options of type {kind} are not supported")
        parse = kind if meta.get("low") is None else _at_least(kind, meta["low"])
        # a thread count has the machine's bound (a huge one crashes PyTorch's pool)
        kwargs = {
            "type": _thread_count if f.name == "threads" and kind is int else parse,
            "default": default,
            "help": help_text,
        }
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta["metavar"] or _SCALARS[kind]
        if several:
            kwargs["nargs"] = "+"
        group.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, **fixed):
    """The dataclass `cls` from parsed options (fields not among them keep their defaults)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(args, f.name):
            value = getattr(args, f.name)
            if isinstance(value, list) and typing.get_origin(_strip_none(hints[f.name])) is tuple:
                value = tuple(value)
            values[f.name] = value
    values.update(fixed)
    return cls(**values)
