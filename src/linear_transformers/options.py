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
import types
import typing
from pathlib import Path

_SCALARS = {int: "INT", float: "FLOAT", str: "STR", Path: "PATH"}


def option(default, help: str, *, choices=None, metavar: str | None = None):
    """A dataclass field that is also a command-line option."""
    metadata = {"help": help, "choices": None if choices is None else list(choices), "metavar": metavar}
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
        kwargs = {"type": kind, "default": default, "help": help_text}
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
