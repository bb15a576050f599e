"""The copy task: its data are what the paper describes, and the experiment runs end to end (--quick),
writes its results, and resumes method by method."""

from __future__ import annotations

import csv
import json

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


def test_quick_copy_experiment_writes_results_and_resumes(tmp_path, capsys):
    args = ["copy", "--quick", "--methods", "softmax", "linear", "lsh-4", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "copy.csv").read_text().splitlines()))
    assert {r["method"] for r in rows} == {"softmax", "linear", "lsh-4"}
    assert all(0 <= float(r["eval_accuracy"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    assert "| lsh-4 | 12 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "copy.png").stat().st_size > 10_000
    # a second run finds every method's results and trains nothing
    capsys.readouterr()
    saved = json.loads((tmp_path / "linear.json").read_text())
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("not trained again") == 3 and "training" not in out
    assert json.loads((tmp_path / "linear.json").read_text()) == saved
    # other settings retrain
    assert main([*args, "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("training 12 steps") == 3


def test_options_given_win_over_the_quick_and_paper_presets(tmp_path):
    """--quick and --paper fill in only what the command line left out: --quick --steps 5 runs 5 steps."""
    import argparse

    from linear_transformers.cli import dispatch
    from linear_transformers.experiments import copy as copy_experiment

    seen = {}

    class Probe:
        __doc__ = copy_experiment.__doc__
        add_arguments = staticmethod(copy_experiment.add_arguments)

        @staticmethod
        def main(args: argparse.Namespace) -> int:
            seen["s"] = copy_experiment.settings_from(args)
            return 0

    assert dispatch("x", "x", {"copy": Probe}, ["copy", "--quick", "--steps", "5", "--d-model", "24"]) == 0
    assert (seen["s"].steps, seen["s"].d_model, seen["s"].n_layers) == (5, 24, 2)  # n_layers from the preset
    dispatch("x", "x", {"copy": Probe}, ["copy", "--paper", "--max-symbols", "64"])
    assert (seen["s"].max_symbols, seen["s"].steps) == (64, 10000)
