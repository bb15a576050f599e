"""The paper's experiments at a scale these machines run: `linear-transformers experiment <name>`."""

from __future__ import annotations

import json
from pathlib import Path


def load_finished(path: Path, settings: dict) -> list[dict] | None:
    """The rows a method saved at `path` when it finished with these settings, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["rows"] if saved.get("settings") == settings else None


def save_finished(path: Path, settings: dict, rows: list[dict]) -> None:
    """Write a method's rows atomically: they appear whole or not at all."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "rows": rows}))
    tmp.replace(path)
