"""The generation benchmark runs end to end in --quick mode: verifies, times, writes CSV, table and plot."""

from __future__ import annotations

import csv

from linear_transformers.bench.__main__ import main


def test_quick_generate_benchmark(tmp_path, capsys):
    assert main(["generate", "--quick", "--tables", "--configs", "mnist", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "generate.csv").read_text().splitlines()))
    generators = {r["generator"] for r in rows}
    assert {"linear-rnn", "linear-rnn-bf16", "softmax-cache", "softmax-recompute", "lsh-1", "lsh-4"} < generators
    assert all(float(r["seconds_per_image"]) > 0 for r in rows if r["seconds_per_image"])
    assert "| mnist | linear-rnn |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "generate.png").stat().st_size > 10_000
    paper = (tmp_path / "paper.md").read_text()
    assert "mnist (Table 1 of the paper)" in paper and "| lsh-4 | 0.270 | 0.6x |" in paper
    out = capsys.readouterr().out
    assert "greedy generation of 24 tokens equals recomputing the prefix" in out
    assert "lsh-4: seeded greedy generation (recomputing) reproduces" in out
