"""The paper's experiments at a scale these machines run: `linear-transformers experiment <name>`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..options import option


@dataclass
class RunSwitches:
    """The switches every experiment takes besides its settings (no result depends on them)."""

    quick: bool = option(False, "a tiny run in seconds, into its own folder (the tests run it)")
    fresh: bool = option(False, "train every method again even if its results exist")


# Settings added after results were committed, with the value every earlier result had: a result
# that lacks one was run with that value (image's norm and feature map: 2026-12-07).
ADDED_LATER = {"norm": "pre", "feature_map": "elu"}


def load_finished(path: Path, settings: dict) -> list[dict] | None:
    """The rows a method saved at `path` when it finished with these settings, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    earlier = {k: v for k, v in ADDED_LATER.items() if k in settings}
    return saved["rows"] if {**earlier, **saved.get("settings", {})} == settings else None


def save_finished(path: Path, settings: dict, rows: list[dict]) -> None:
    """Write a method's rows atomically: they appear whole or not at all."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "rows": rows}))
    tmp.replace(path)


def finished_or_run(out: Path, method: str, settings: dict, fresh: bool, run: Callable[[], list[dict]]) -> list[dict]:
    """A method's rows from out/<method>/result.json when it finished with these settings (unless
    fresh: then its folder is cleared); otherwise run() it and save what it returns."""
    done = out / method / "result.json"
    saved = None if fresh else load_finished(done, settings)
    if saved is not None:
        print(f"  {method}: finished earlier with these settings ({done}); --fresh retrains")
        return saved
    if fresh and (out / method).exists():
        shutil.rmtree(out / method)
    rows = run()
    save_finished(done, settings, rows)
    return rows
