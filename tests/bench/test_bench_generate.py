"""The generation benchmark runs end to end in --quick mode: verifies, times, writes CSV, table and plot."""

from __future__ import annotations

import csv

from linear_transformers.bench.__main__ import main


def test_quick_generate_benchmark(tmp_path, capsys):
    assert main(["generate", "--quick", "--configs", "mnist", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "generate.csv").read_text().splitlines()))
    generators = {r["generator"] for r in rows}
    assert {"linear-rnn", "linear-rnn-bf16", "softmax-cache", "softmax-recompute"} <= generators
    assert all(float(r["seconds_per_image"]) > 0 for r in rows if r["seconds_per_image"])
    assert "| mnist | linear-rnn |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "generate.png").stat().st_size > 10_000
    assert "greedy generation of 24 tokens equals recomputing the prefix" in capsys.readouterr().out
