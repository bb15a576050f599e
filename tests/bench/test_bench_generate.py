"""The generation benchmark runs end to end in --quick mode: verifies, times, writes CSV, table and plot."""

from __future__ import annotations

import csv

from linear_transformers.bench import generate, measure
from linear_transformers.bench.__main__ import main


def test_quick_generate_benchmark(tmp_path, capsys):
    assert main(["generate", "--quick", "--tables", "--configs", "mnist", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "generate.csv").read_text().splitlines()))
    generators = {r["generator"] for r in rows}
    assert {"linear-rnn", "linear-rnn-bf16", "softmax-cache", "softmax-recompute", "lsh-1", "lsh-4"} < generators
    assert all(float(r["seconds_per_image"]) > 0 for r in rows if r["seconds_per_image"])
    table = (tmp_path / "table.md").read_text()
    assert "| mnist | linear-rnn |" in table and "whole images at batch 1: median s" in table
    whole = {r["generator"]: r for r in rows if r["whole_image_median_s"]}
    # generate(n=1) timed per RNN mode, 2 images each, and through the PyTorch step
    assert {"linear-rnn", "linear-rnn-bf16", "linear-rnn-pytorch"} <= set(whole)
    assert all(len(r["whole_image_s"].split()) == 2 and float(r["whole_image_median_s"]) > 0 for r in whole.values())
    assert generate.FLOOR in whole  # the bandwidth floor is timed with them
    steps = [r for r in rows if r["step_ms_fused"]]
    assert [int(r["batch"]) for r in steps] == [1, 4, 8] and "RNN step, fused C: ms" in table
    assert (tmp_path / "generate.png").stat().st_size > 10_000
    paper = (tmp_path / "paper.md").read_text()
    assert "mnist (Table 1 of the paper)" in paper and "| lsh-4 | 0.270 | 0.6x |" in paper
    out = capsys.readouterr().out
    assert "greedy generation of 24 tokens equals recomputing the prefix" in out
    assert "lsh-4: seeded greedy generation (recomputing) reproduces" in out


def test_generate_benchmark_per_isa_level(tmp_path, capsys):
    """--isa with --parts: per level (own process, own build) whole images and one step at batch 1,
    fused against the PyTorch step of the same process."""
    from linear_transformers.native import build

    level = build.supported_levels()[0]
    args = ["generate", "--quick", "--configs", "mnist", "--parts", "images", "steps", "--isa", level, "generic"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "levels.csv").read_text().splitlines()))
    assert [r["level"] for r in rows] == [level, "generic"]
    measured = ("fused_f32_image_s", "pytorch_image_s", "fused_step_ms", "pytorch_step_ms")
    assert all(float(r[k]) > 0 for r in rows for k in measured)
    inner = list(csv.DictReader((tmp_path / level / "generate.csv").read_text().splitlines()))
    assert not any(r.get("seconds_per_image") or r.get("tokens_per_s") for r in inner)  # only the parts asked for
    text = (tmp_path / "levels.md").read_text()
    assert f"C kernels: {level} (" in text and "C kernels: generic (" in text and "| PyTorch / fused |" in text
    assert str(tmp_path / "levels.md") in capsys.readouterr().out


def test_paper_tables_when_a_generator_is_timed_at_batch_1_only():
    """At CIFAR-10 length the recomputing generators are timed at batch 1 only: the fixed-batch
    columns then use the batch-1 timing, marked with its batch."""
    from linear_transformers.bench.generate import paper_tables

    def row(g, batch, s):
        return {
            "config": "cifar",
            "generator": g,
            "batch": batch,
            "fixed_batch": batch != 1,
            "seconds_per_image": s,
            "images_per_s": 1 / s,
        }

    rows = [
        row("linear-rnn", 1, 10.0),
        row("linear-rnn", 64, 2.0),
        row("softmax-recompute", 1, 1000.0),
        row("lsh-4", 1, 4000.0),
    ]
    table = paper_tables(rows, 64)
    assert "cifar (Table 2 of the paper)" in table
    assert "| softmax | 0.004 | 1.0x | 0.001 (batch 1) | 1.0x | 1000.00 | 1.0x |" in table
    assert "| linear | 17.850 | 4462.5x | 0.500 | 500.0x | 10.00 | 100.0x |" in table
    assert "| lsh-4 | 0.005 | 1.2x | 0.000 (batch 1) | 0.2x | 4000.00 | 0.2x |" in table


def test_read_f32_reads_every_element():
    """The floor's read (measure.read_f32) covers every element of every tensor, whatever its size."""
    import pytest
    import torch

    from linear_transformers.decode import fused

    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    tensors = [torch.rand(n) + 1 for n in (1, 15, 64, 65, 1000, 65536 + 7, 300_001)]
    expected = sum(float(t.double().sum()) for t in tensors)
    assert abs(measure.read_f32(tensors) - expected) < 1e-5 * expected
    for t in tensors:  # each alone, so a missed tail of a small one shows
        assert abs(measure.read_f32([t]) - float(t.double().sum())) <= 1e-5 * float(t.double().sum())
    assert abs(measure.read_f32(tensors, passes=3) - expected) < 1e-5 * expected  # the mean over passes
    with pytest.raises(ValueError, match="passes must be >= 1"):
        measure.read_f32(tensors, passes=0)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensors"):
        measure.read_f32([torch.rand(8, dtype=torch.float64)])
