"""The attention benchmark runs end to end in --quick mode: verifies, times, writes CSV, table and plot."""

from __future__ import annotations

import csv
import math

from linear_transformers.bench.__main__ import main


def test_quick_attention_benchmark(tmp_path, capsys):
    assert main(["attention", "--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "attention.csv").read_text().splitlines()))
    assert {r["impl"] for r in rows} == {"naive", "chunked", "cpu", "auto", "softmax"}
    assert all(float(r["fwd_ms"]) > 0 and float(r["fwdbwd_ms"]) > 0 for r in rows)
    assert "| N |" in (tmp_path / "table.md").read_text()
    auto = list(csv.DictReader((tmp_path / "auto.csv").read_text().splitlines()))  # auto vs the faster, interleaved
    assert [int(r["N"]) for r in auto] == sorted({int(r["N"]) for r in rows})
    rounds = list(csv.DictReader((tmp_path / "auto_rounds.csv").read_text().splitlines()))
    for r in auto:
        assert r["faster"] in ("cpu", "chunked")
        assert abs(float(r["auto_vs_best_min"]) - float(r["auto_fwdbwd_ms"]) / float(r["faster_fwdbwd_ms"])) < 1e-9
        mine = [x for x in rounds if x["N"] == r["N"]]
        assert int(r["rounds"]) == len(mine) == 2 and {x["first"] for x in mine} == {"auto", r["faster"]}
        # one round of each order: the estimate is the geometric mean of their two ratios
        expect = math.sqrt(float(mine[0]["ratio"]) * float(mine[1]["ratio"]))
        assert abs(float(r["auto_vs_best"]) - expect) < 1e-9
    assert "paired rounds: N=" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "chunked vs naive, outputs and dq/dk/dv" in out and "cpu vs naive, outputs and dq/dk/dv" in out
    assert str(tmp_path) in out
    assert (tmp_path / "log.txt").read_text() == out  # (the dispatcher keeps what a benchmark printed)


def test_auto_paired_rounds_balance_the_order(monkeypatch):
    """Without --quick, auto and the faster path take --repeats rounds, who goes first swapping each
    round; a fixed cost on whichever runs first (a position effect) cancels out of the estimate."""
    import argparse

    from linear_transformers.bench import attention

    clock = {"t": 0.0, "calls": 0}  # two untimed warm-up calls, then the first of each pair is an odd call

    def fake_counter():  # each timed call takes 10 ms, plus 3 ms when it is the first of its round
        return clock["t"]

    def fake_attention(impl, q, k, v, chunk_size):
        def run():
            clock["calls"] += 1
            clock["t"] += 0.010 + (0.003 if clock["calls"] % 2 == 1 else 0.0)
            return (q * k * v).sum(-1, keepdim=True).expand_as(v)

        return run

    monkeypatch.setattr(attention, "_attention", fake_attention)
    args = argparse.Namespace(
        batch=1, heads=2, dim=8, dtype="float32", device="cpu", chunk_size=16, quick=False, repeats=5
    )
    row, rounds = attention.auto_interleaved(args, 64, "chunked", clock=fake_counter)
    assert row["rounds"] == len(rounds) == 5 and [r["first"] for r in rounds] == ["auto", "chunked"] * 2 + ["auto"]
    assert abs(row["auto_first_ratio"] - 1.3) < 1e-9 and abs(row["auto_second_ratio"] - 1 / 1.3) < 1e-9
    assert abs(row["auto_vs_best"] - 1.0) < 1e-9  # the two identical functions come out equal


def test_attention_benchmark_per_isa_level(tmp_path, capsys):
    """--isa: one process per level, each with its own kernel build and PyTorch capped to the same
    level, then the levels side by side."""
    from linear_transformers.native import build

    below_best = [lv for lv in build.supported_levels() if lv in ("x86-64-v3", "x86-64", "armv8-a")]
    levels = [*below_best[:1], "generic"]
    args = ["attention", "--quick", "--impls", "chunked", "cpu", "auto", "--out", str(tmp_path), "--isa", *levels]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "levels.csv").read_text().splitlines()))
    assert [r["level"] for r in rows] == [lv for lv in levels for _ in (128, 256)]
    assert all(float(r["cpu_vs_chunked_fwdbwd"]) > 0 and float(r["auto_vs_best_fwdbwd"]) > 0 for r in rows)
    text = (tmp_path / "levels.md").read_text()
    for level in levels:  # each level's own header names its build
        assert f"C kernels: {level} (" in text
        assert (tmp_path / level / "attention.csv").exists()
        assert (tmp_path / level / "auto.csv").exists()  # the "auto / best" column comes from it
    if "x86-64-v3" in levels:
        assert "PyTorch kernels: AVX2" in text  # capped like an AVX2 machine
    assert (tmp_path / "levels.png").stat().st_size > 10_000
    assert str(tmp_path / "levels.md") in capsys.readouterr().out


def test_verification_failure_stops_the_benchmark(tmp_path, monkeypatch):
    import pytest

    from linear_transformers.ops import chunked

    real = chunked.forward
    monkeypatch.setattr(chunked, "forward", lambda *a, **k: (lambda o, s: (o * 1.01, s))(*real(*a, **k)))
    with pytest.raises(SystemExit, match="verification failed"):
        main(["attention", "--quick", "--out", str(tmp_path)])
    assert not (tmp_path / "attention.csv").exists()


def test_quick_figure1(tmp_path, capsys):
    """--figure1: every method verified against its reference, timed per sample, skips marked."""
    args = ["attention", "--figure1", "--quick", "--out", str(tmp_path)]
    assert main([*args, "--memory-gib", "0.0001"]) == 0
    rows = list(csv.DictReader((tmp_path / "figure1.csv").read_text().splitlines()))
    assert {r["method"] for r in rows} == {"softmax", "softmax-math", "linear", "lsh-1", "lsh-4", "lsh-8"}
    measured = [r for r in rows if r["fwdbwd_ms_per_sample"]]
    assert {r["method"] for r in measured} == {"softmax", "linear"}  # the others' scores exceed 0.0001 GiB
    assert all(float(r["fwdbwd_ms_per_sample"]) > 0 and int(r["batch"]) == 512 // int(r["N"]) for r in measured)
    table = (tmp_path / "table.md").read_text()
    assert "Skipped: softmax-math N=128 (would need ~" in table
    assert (tmp_path / "figure1.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "lsh-8 vs dense masked reference (same buckets)" in out and "softmax-math vs explicit softmax" in out
