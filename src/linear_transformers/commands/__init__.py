"""Every command line of linear-transformers: the commands, the benchmarks and the experiments from one table.

`COMMANDS` names each command's module (imported only when it runs); each module declares its
options (`add_arguments`) and runs (`main`). `dispatch` is the one dispatcher: `linear-transformers`
(cli.py) and `python -m linear_transformers.bench` / `.experiments` all go through it. Presets
(`apply_preset`) fill in only the options that were not given."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import shlex
import sys
from pathlib import Path

from ..options import Parser


class _Tee(io.StringIO):
    """While entered, everything written to stdout also goes into this buffer."""

    def __enter__(self):
        self._stdout = sys.stdout
        sys.stdout = self
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout = self._stdout

    def write(self, text: str) -> int:
        self._stdout.write(text)
        return super().write(text)

    def flush(self) -> None:
        self._stdout.flush()


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options in argv (not those left at their defaults). Changes the
    parser's defaults: call it on a parser that has done its parsing."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (module docstrings), and every option's default in --help."""


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: the module that implements it (imported only when it runs: add_arguments(parser)
    and main(args), args.given being the options typed) and its one-line help."""

    module: str
    help: str | None = None  # (None: its module docstring's first line)

    def summary(self) -> str:
        return self.help or (importlib.import_module(self.module).__doc__ or "").strip().splitlines()[0]


# Every command of `linear-transformers`, by name; a dict is a group of subcommands
# (`linear-transformers bench attention`). The one table: `cli.main` and `python -m` of each group run it.
BENCHMARKS = {
    name: Command(f"linear_transformers.bench.{name}")
    for name in (
        "attention",
        "dispatch",
        "generate",
        "gpu",
        "hf",
        "linearized",
        "packed",
        "parallel",
        "threads",
        "training",
    )
}
EXPERIMENTS = {
    name: Command(f"linear_transformers.experiments.{name.replace('-', '_')}")
    for name in ("copy", "image", "image-gap", "speech")
}
COMMANDS: dict[str, Command | dict] = {
    "train": Command("linear_transformers.commands.train", "train (or resume) a causal transformer"),
    "sample": Command("linear_transformers.commands.sample", "generate images (PNG grid) or text from a checkpoint"),
    "eval": Command("linear_transformers.commands.eval", "test bits/dim of a checkpoint"),
    "export": Command(
        "linear_transformers.export", "export a model: its recurrent step to ONNX, or a transformers folder"
    ),
    "web": Command("linear_transformers.web", "serve the in-browser generation demo on localhost"),
    "demo": Command("linear_transformers.demo", "train a small model on MNIST and generate digits as an RNN"),
    "linearize": Command(
        "linear_transformers.linearize.transfer",
        "turn SmolLM2-135M into linear attention, stage 1: attention transfer (the [linearize] extra)",
    ),
    "finetune": Command(
        "linear_transformers.linearize.finetune",
        "stage 2 of linearisation: LoRA on a linearised model (the [linearize] extra)",
    ),
    "linearize-summary": Command(
        "linear_transformers.linearize.summary", "the linearisation runs of a folder in one result.json and table"
    ),
    "linearize-context": Command(
        "linear_transformers.linearize.context",
        "held-out perplexity of linearised models by the context each token has (is the linear part used?)",
    ),
    "prepare": Command(
        "linear_transformers.commands.prepare",
        "compile and time the C kernels now (after install, or in a Docker layer), so that a first run starts at once",
    ),
    "bench": BENCHMARKS,
    "experiment": EXPERIMENTS,
}
DESCRIPTION = (
    "Linear attention transformers as RNNs (Katharopoulos et al., 2020): train, sample, evaluate, export and "
    "benchmark them, and linearise a pretrained language model."
)
GROUP_HELP = {
    "bench": "benchmarks (programs that verify, time, and write CSV, plots and tables)",
    "experiment": "the paper's experiments",
}


def leaves(table: dict | None = None, prefix: str = "") -> dict[str, Command]:
    """Every runnable command of `table` by its full name ("bench attention")."""
    found = {}
    for name, entry in (COMMANDS if table is None else table).items():
        full = f"{prefix}{name}"
        found.update(leaves(entry, full + " ") if isinstance(entry, dict) else {full: entry})
    return found


def parser_for(command: Command, prog: str) -> argparse.ArgumentParser:
    """The parser of one command, its options declared by its module."""
    module = importlib.import_module(command.module)
    parser = Parser(prog=prog, description=module.__doc__ or command.help, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser


def dispatch(prog: str, argv: list[str] | None = None, table: dict | None = None, version: str | None = None) -> int:
    """Run the command that argv names in `table` (default: every command), or say in one line what
    is wrong: the one dispatcher of every command line of the package."""
    argv = list(sys.argv[1:] if argv is None else argv)
    table = COMMANDS if table is None else table
    if argv and argv[0] in table:
        name, rest = argv[0], argv[1:]
        entry = table[name]
        if isinstance(entry, dict):
            return dispatch(f"{prog} {name}", rest, entry)
        parser = parser_for(entry, f"{prog} {name}")
        args = parser.parse_args(rest)
        # which options were given (presets such as --quick and --paper fill in only the others)
        args.given = given_options(parser, rest)
        args.command_line = shlex.join([*prog.split(), name, *rest])  # (results record what made them)
        run = importlib.import_module(entry.module).main
        if not (entry.module.startswith("linear_transformers.bench.") or entry.module == "linear_transformers.demo"):
            return run(args)
        with _Tee() as printed:  # (a benchmark's or the demo's folder keeps what it printed)
            code = run(args)
        out = getattr(args, "out", None)
        if out is not None and Path(out).is_dir():
            (Path(out) / "log.txt").write_text(printed.getvalue())
        return code
    # no command named: the listing (--help, --version), or what was wrong, in one line
    parser = Parser(prog=prog, description=DESCRIPTION if table is COMMANDS else None)
    if version:
        parser.add_argument("--version", action="version", version=version)
    if table is COMMANDS:
        parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(table) + "}")
    for name, entry in table.items():
        sub.add_parser(name, help=GROUP_HELP.get(name) if isinstance(entry, dict) else entry.summary(), add_help=False)
    parser.parse_args(argv)  # exits: help, version, or the mistake
    raise AssertionError(f"{prog}: no command in {argv}")  # (argparse exits above)


def apply_preset(settings, preset: dict, given: set[str]):
    """`settings` (a dataclass) with the preset's values for the fields not given on the command line."""
    return dataclasses.replace(settings, **{k: v for k, v in preset.items() if k not in given})
