"""bench training runs end to end (--quick): the C kernel and chunked agree, every arm at both
precisions is timed (bf16 autocast included: the chunked backend once failed under it), and the
CSV, table and plot are written."""

from __future__ import annotations

import csv
import json

from linear_transformers.bench.__main__ import main


def test_quick_training_benchmark(tmp_path, capsys):
    assert main(["training", "--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "training.csv").read_text().splitlines()))
    assert {(r["arm"], r["precision"]) for r in rows} == {
        (a, p) for a in ("linear-cpu", "linear-chunked", "softmax") for p in ("float32", "bf16")
    }
    assert all(float(r["tokens_per_s"]) > 0 and float(r["verified_error"]) < 1e-3 for r in rows)
    assert {r["vs_softmax"] for r in rows if r["arm"] == "softmax"} == {"1.0"}
    assert "largest relative difference" in capsys.readouterr().out
    record = json.loads((tmp_path / "run.json").read_text())  # what made the numbers, written by the program
    assert record["command"].startswith("python -m linear_transformers.bench training --quick") and record["git_commit"]
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG" and "x softmax" in (
        tmp_path / "table.md"
    ).read_text()
