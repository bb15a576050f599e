"""Every script in examples/ runs to its end in its quick mode (as a user would run it: a fresh
Python process from the repository root), and says what its checks found."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"quickstart.py", "char_model.py", "hf_quickstart.py"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    if script.name == "hf_quickstart.py":
        pytest.importorskip("transformers")
    quick = [] if script.name == "quickstart.py" else ["--quick"]
    run = subprocess.run(
        [sys.executable, str(script), *quick], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, f"{script.name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    if script.name == "quickstart.py":  # its comparisons, printed: recurrent == parallel and so on
        diffs = [float(line.rsplit(" ", 1)[1]) for line in run.stdout.splitlines() if "==" in line]
        assert len(diffs) == 3 and max(diffs) < 1e-4, run.stdout
    if script.name == "char_model.py":
        assert "bits/char" in run.stdout and run.stdout.strip().splitlines()[-1][1:].startswith("The ")
