"""bench threads: the attention kernel timed right after other work, on PyTorch's OpenMP pool and
on pthreads (a smoke run and its check)."""

from __future__ import annotations

import csv
import re

import pytest

from linear_transformers.bench import threads
from linear_transformers.bench.__main__ import main
from linear_transformers.native import build
from linear_transformers.ops import cpu


@pytest.mark.skipif(not build.compilers(), reason="no C compiler on this machine")
def test_bench_threads_quick(tmp_path):
    assert cpu.available(), cpu.unavailable_reason()
    assert main(["threads", "--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "threads.csv") as f:
        rows = list(csv.DictReader(f))
    builds = {r["build"] for r in rows}
    # pthreads is always built; the OpenMP build wherever the compiler has PyTorch's runtime
    assert "pthreads" in builds and ("openmp" in builds) == build.shares_pytorch_openmp(
        "clang" in build.compiler_version(build.default_compiler()).lower()
    )
    cases = {(r["build"], r["phase"], r["timed"], r["after"]) for r in rows}
    assert len(rows) == 2 * len(cases)  # every case once per round, 2 rounds
    assert {(r["timed"], r["after"]) for r in rows} == {
        *(("kernel", b) for b in threads.BEFORE),
        ("chunked", "chunked"),
        ("chunked", "kernel"),
    }
    assert all(float(r["ms"]) > 0 for r in rows)
    assert "right after" in (tmp_path / "table.md").read_text()


def test_bench_threads_refuses_a_kernel_that_differs(monkeypatch):
    from linear_transformers.ops import chunked

    forward = chunked.run_forward

    def off(*args):
        fwd = forward(*args)
        return fwd._replace(y=fwd.y * 1.01)

    monkeypatch.setattr(chunked, "run_forward", off)
    with pytest.raises(SystemExit, match="differs from 'chunked'"):
        threads.measure("openmp", 64, 1)


@pytest.mark.parametrize("option", ["--length", "--repeats", "--threads"])
def test_bench_threads_refuses_counts_below_one(option, tmp_path, capsys):
    from linear_transformers import cli

    assert cli.main(["bench", "threads", option, "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(f"{option}:? must be >= 1, got 0", err) and "Traceback" not in err and len(err.splitlines()) == 1
