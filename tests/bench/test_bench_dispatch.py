"""bench dispatch: the eager path against the registered operators (a smoke run and its check)."""

from __future__ import annotations

import csv

import pytest

from linear_transformers.bench import dispatch
from linear_transformers.bench.__main__ import main


def test_bench_dispatch_quick(tmp_path):
    assert main(["dispatch", "--quick", "--backends", "chunked", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "dispatch.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["backend"], r["T"]) for r in rows] == [("chunked", "64"), ("chunked", "196")]
    assert all(float(r["operators_us"]) > 0 and float(r["eager_us"]) > 0 for r in rows)
    assert "operators / eager" in (tmp_path / "table.md").read_text()


def test_bench_dispatch_refuses_paths_that_differ(monkeypatch):
    from linear_transformers.ops import library

    apply = library.EagerCausalLinearAttention.apply

    def off_by_a_bit(*args):
        y, S, z = apply(*args)
        return y * (1 + 1e-7), S, z

    monkeypatch.setattr(library.EagerCausalLinearAttention, "apply", off_by_a_bit)
    with pytest.raises(SystemExit, match="the eager path differs from the operators"):
        dispatch.verify("chunked")
