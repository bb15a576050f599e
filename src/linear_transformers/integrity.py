"""SHA-256 records of files: a SHA256SUMS file (the `sha256sum -c` format, a comment first) beside
the files it covers, written by training (checkpoints) and `export --hf`, checked on every load, so
a truncated or damaged file is named instead of loaded."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SUMS = "SHA256SUMS"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sums(folder: Path, names: list[str], header: str) -> None:
    """SHA256SUMS in `folder` for the files `names` (the `sha256sum -c` format, a comment first)."""
    lines = [f"# {header}"] + [f"{file_sha256(folder / n)}  {n}" for n in sorted(names)]
    (folder / SUMS).write_text("\n".join(lines) + "\n")


def read_sums(folder: Path) -> dict[str, str] | None:
    """name -> SHA-256 from the folder's SHA256SUMS, or None without one."""
    path = folder / SUMS
    if not path.exists():
        return None
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            raise ValueError(f"{path} is damaged (a line reads {line[:80]!r})")
        sums[name] = digest
    return sums


def verify_file(folder: Path, name: str, expected: str | None) -> None:
    """Raise ValueError unless folder/name matches `expected` and the folder's SHA256SUMS entry."""
    sums = read_sums(folder) or {}
    for source, digest in (("config.json", expected), (SUMS, sums.get(name))):
        if digest and file_sha256(folder / name) != digest:
            raise ValueError(
                f"{folder / name} does not match the SHA-256 in its {source}: the file is corrupted or truncated"
            )
