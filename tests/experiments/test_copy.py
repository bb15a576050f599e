"""The copy task: its data are what the paper describes, and the experiment runs end to end (--quick),
writes its results, and resumes method by method."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from linear_transformers.data import copy as copy_data
from linear_transformers.experiments.__main__ import main


def test_copy_batches_hold_a_string_a_separator_and_its_copy():
    g = torch.Generator().manual_seed(3)
    tokens, mask = copy_data.copy_batch(200, max_symbols=12, n_symbols=10, generator=g)
    assert tokens.shape == mask.shape == (200, copy_data.seq_len(12))
    assert tokens.max() < copy_data.vocab_size(10)
    lengths = set()
    for row, m in zip(tokens.tolist(), mask.tolist(), strict=True):
        L = sum(m)
        lengths.add(L)
        assert row[0] == copy_data.SEP and row[L + 1] == copy_data.SEP
        x = row[1 : L + 1]
        assert all(2 <= s < 12 for s in x)
        assert row[L + 2 : 2 * L + 2] == x  # the copy, where the mask is
        assert m == [False] * (L + 2) + [True] * L + [False] * (len(row) - 2 * L - 2)
        assert all(s == copy_data.PAD for s in row[2 * L + 2 :])
    assert min(lengths) == 1 and max(lengths) == 12  # lengths are uniform over 1 .. max_symbols


def test_the_papers_layout_fills_128_tokens_with_strings_of_a_quarter_to_a_half():
    """--paper's data: strings of 32 .. 63 symbols in 128 tokens (the authors' public copy-task code)."""
    from linear_transformers.experiments.copy import PAPER

    g = torch.Generator().manual_seed(0)
    tokens, mask = copy_data.copy_batch(500, PAPER["max_symbols"], 10, g, min_symbols=PAPER["min_symbols"])
    assert tokens.shape[1] == 128
    lengths = mask.sum(1)
    assert lengths.min() == 32 and lengths.max() == 63
    for bad in (0, 64):
        with pytest.raises(ValueError, match="min_symbols must be in 1 .. max_symbols=63"):
            copy_data.copy_batch(2, 63, 10, g, min_symbols=bad)


def test_quick_copy_experiment_writes_results_and_resumes(tmp_path, capsys):
    args = ["copy", "--quick", "--methods", "softmax", "linear", "lsh-4", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "copy.csv").read_text().splitlines()))
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("softmax", "linear", "lsh-4") for s in "01"}
    assert all(0 <= float(r["eval_accuracy"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| lsh-4 | 2 | 12 |" in table and "steps to 99%" in table
    assert (tmp_path / "copy.png").stat().st_size > 10_000
    record = json.loads((tmp_path / "run.json").read_text())  # what made the folder, written by the program
    assert record["command"].startswith("python -m linear_transformers.experiments copy --quick")
    assert record["git_commit"] and record["torch"] and record["models"]["linear"]["norm"] in ("pre", "post")
    out = capsys.readouterr().out
    assert "estimated" in out and "minutes here" in out  # the estimate comes before the training
    # a second run finds every run's results and trains nothing
    saved = json.loads((tmp_path / "linear-seed1.json").read_text())
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("not trained again") == 6 and "training" not in out
    assert json.loads((tmp_path / "linear-seed1.json").read_text()) == saved
    # a new seed trains only that seed; other settings retrain
    three = ["copy", "--quick", "--methods", "softmax", "linear", "lsh-4", "--seeds", "0", "1", "2"]
    assert main([*three, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("not trained again") == 6 and out.count("training 12 steps") == 3
    assert main([*args, "--steps", "6"]) == 0
    assert capsys.readouterr().out.count("training 6 steps") == 6


def test_seeds_in_parallel_processes_give_the_results_of_one_process(tmp_path):
    """--jobs 2 trains runs in two processes; each run's curve is the one a single process gives."""
    args = ["copy", "--quick", "--methods", "softmax", "linear", "--seeds", "0", "1"]
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--jobs", "1", "--out", str(tmp_path / "b")]) == 0
    for name in ("softmax-seed0", "linear-seed1"):
        a = json.loads((tmp_path / "a" / f"{name}.json").read_text())["rows"]
        b = json.loads((tmp_path / "b" / f"{name}.json").read_text())["rows"]
        assert [r["eval_loss"] for r in a] == pytest.approx([r["eval_loss"] for r in b], rel=1e-4)


def test_quick_runs_write_their_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["copy", "--quick", "--methods", "linear"]) == 0
    assert (tmp_path / "results" / "copy-quick" / "linear-seed0.json").exists()
    assert not (tmp_path / "results" / "copy").exists()


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="--min-symbols must be in 1 .. --max-symbols=8"):
        main(["copy", "--quick", "--min-symbols", "9", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda"):
        main(["copy", "--quick", "--device", "tpu", "--out", str(tmp_path)])


def test_options_given_win_over_the_quick_and_paper_presets(tmp_path, monkeypatch):
    """--quick and --paper fill in only what the command line left out: --quick --steps 5 runs 5 steps."""
    from linear_transformers import commands
    from linear_transformers.experiments import copy as copy_experiment

    seen = {}
    monkeypatch.setattr(copy_experiment, "main", lambda args: seen.update(s=copy_experiment.settings_from(args)) or 0)

    def dispatch(argv):
        return commands.dispatch("x", argv, commands.EXPERIMENTS)

    assert dispatch(["copy", "--quick", "--steps", "5", "--d-model", "24"]) == 0
    assert (seen["s"].steps, seen["s"].d_model, seen["s"].n_layers) == (5, 24, 2)  # n_layers from the preset
    dispatch(["copy", "--paper", "--max-symbols", "64"])
    assert (seen["s"].max_symbols, seen["s"].min_symbols, seen["s"].steps, seen["s"].n_heads) == (64, 32, 10000, 4)
