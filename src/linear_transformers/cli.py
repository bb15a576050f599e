"""The `linear-transformers` command: every subcommand from commands.COMMANDS (commands.dispatch),
with one way of reporting what went wrong.

Options are generated from each command's config dataclass (options.py): every field is an option
with its default and help, and an unknown option is an error.
"""

from __future__ import annotations

import sys

from . import commands
from .train import TrainingDiverged

# What a user can cause by what they typed or pointed at (a bad value, a missing or existing file):
# one line and exit status 2. Anything else is a bug in the program and keeps its traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    TrainingDiverged,
)


def main(argv: list[str] | None = None) -> int:
    """The command line. A user error prints `linear-transformers <command>: error: <what>` and
    returns 2 (`--debug` shows the traceback instead); Ctrl-C returns 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _own_process_settings()
    _show_library_log()
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    try:
        return _run(argv)
    except SystemExit as e:  # argparse: --help (0), or a mistake on the command line it has said in one line (2)
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        # a program's own SystemExit("why"), a benchmark's failed verification: said, status 1, as Python does
        print(f"linear-transformers {command}: {e.code}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"linear-transformers {command}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # too big for this machine: the user's sizes, said in one line
        if debug or not (isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(
            f"linear-transformers {command}: error: out of memory ({first}); use smaller sizes (batch, length, model)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"linear-transformers {command}: interrupted", file=sys.stderr)
        return 130


# Settings the command line makes because it owns its process (the library never changes a user's
# process-wide allocator): PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge
# pages (THP_MEM_ALLOC_ENABLE, read at the first large allocation). Without it, every fresh 16-32 MB
# tensor costs thousands of page faults; whether a call gets fresh pages or recycled ones depends on
# what glibc happens to hold, which made the attention kernel's times bimodal (70 against 47 ms).
# A value the user set (0 included) is kept.
PROCESS_SETTINGS = {"THP_MEM_ALLOC_ENABLE": "1"}


def _own_process_settings() -> None:
    import os

    for key, value in PROCESS_SETTINGS.items():
        os.environ.setdefault(key, value)


def _show_library_log() -> None:
    """The library's INFO messages (compiling and timing kernels on first use) on stderr, one line
    each, unless the user configured logging themselves; under torchrun only rank 0's."""
    import logging
    import os

    log = logging.getLogger("linear_transformers")
    if log.handlers or os.environ.get("RANK", "0") != "0":
        return

    class _Stderr(logging.StreamHandler):  # (whatever sys.stderr is at the time of each message)
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    handler = _Stderr()
    handler.setFormatter(logging.Formatter("linear-transformers: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _run(argv: list[str]) -> int:
    from . import __version__

    return commands.dispatch("linear-transformers", argv, version=f"linear-transformers {__version__}")


if __name__ == "__main__":
    sys.exit(main())
