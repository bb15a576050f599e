"""`make demo` end to end on tiny data and a tiny model: it trains its fixed number of steps, reuses a
finished run, resumes a cut-short one, and says so when its bits/dim is outside the calibrated range."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from linear_transformers import commands, demo
from linear_transformers import data as datasets
from test_data import write_mnist_folder


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path / "mnist", n_train=64, n_test=250, side=28)
    real_load = datasets.load
    monkeypatch.setattr(demo.datasets, "load", lambda name, **kw: real_load(name, tmp_path / "mnist", **kw))
    monkeypatch.setattr(demo, "MODEL", replace(demo.MODEL, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    monkeypatch.setattr(
        demo,
        "TRAIN",
        replace(demo.TRAIN, steps=4, checkpoint_every=2, eval_every=0, batch_size=8, eval_batches=1, progress=False),
    )
    return ["--out", str(tmp_path / "run"), "--samples", str(tmp_path / "samples.png"), "--threads", "1"]


def test_demo_trains_its_steps_then_reuses_the_run(tiny_demo, capsys, tmp_path):
    assert commands.dispatch("linear-transformers", ["demo", *tiny_demo]) == 0
    out = capsys.readouterr().out
    assert "for 4 steps" in out and "step 4" in out and (tmp_path / "samples.png").stat().st_size > 1000
    # four steps of a tiny model are far from the calibrated 1.0 bits/dim: said plainly
    assert "outside the range this demo was calibrated to" in out
    record = json.loads((tmp_path / "run" / "run.json").read_text())  # what it measured, with its command
    assert record["command"].startswith("linear-transformers demo") and record["git_commit"] is not None
    result = record["result"]
    assert f"test bits/dim: {result['test_bpd']:.4f}" in out and result["step"] == 4 and result["train_seconds"] > 0
    assert result["speed"][0]["generator"].startswith("linear attention, RNN")
    assert (tmp_path / "run" / "log.txt").read_text() == out  # (what it printed)
    assert commands.dispatch("linear-transformers", ["demo", *tiny_demo]) == 0
    assert "reusing the trained model" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["result"]["train_seconds"] is None


def test_a_time_capped_demo_says_so_and_the_next_one_finishes(tiny_demo, capsys, monkeypatch):
    monkeypatch.setattr(demo, "TRAIN", replace(demo.TRAIN, steps=400))
    assert commands.dispatch("linear-transformers", ["demo", *tiny_demo, "--minutes", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "note: training stopped at step" in out and "run make demo again to finish it" in out
    monkeypatch.setattr(demo, "TRAIN", replace(demo.TRAIN, steps=6))
    assert (
        commands.dispatch("linear-transformers", ["demo", *tiny_demo]) == 0
    )  # resumes the cut-short run (not refused, not restarted)
    out = capsys.readouterr().out
    assert "step 6" in out and "training stopped" not in out
