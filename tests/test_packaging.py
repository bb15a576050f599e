"""The wheel ships every file the C kernels are built from (a non-editable install compiles them on
first use, so a missing header would break the fused step for every pip user), and py.typed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_kernel_source(tmp_path):
    from linear_transformers import native
    from linear_transformers.decode import fused, llama  # noqa: F401 (they register their libraries)
    from linear_transformers.ops import cpu  # noqa: F401

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.skip(f"no wheel could be built here: {proc.stderr.strip()[-300:]}")
    wheel = next(tmp_path.glob("linear_transformers-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src"
    needed = {str(path.relative_to(package)) for lib in native._libraries.values() for path in lib.paths}
    assert needed and needed <= names, sorted(needed - names)
    assert "linear_transformers/py.typed" in names
