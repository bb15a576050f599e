"""bench packed and bench parallel: smoke runs on tiny inputs, and their checks."""

from __future__ import annotations

import csv
import json

import pytest

from linear_transformers.bench import packed
from linear_transformers.bench.__main__ import main


def _docs(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("short\n\n" + "a longer paragraph " * 20 + "\n\nx\n\n" + "y" * 300)
    (folder / "b.rst.txt").write_text("\n\n".join(f"para {i} " * (i % 7 + 1) for i in range(40)))
    return folder


def test_bench_packed_quick(tmp_path):
    docs = _docs(tmp_path / "docs")
    assert main(["packed", "--quick", "--docs", str(docs), "--max-len", "128", "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "packed.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == list(packed.MODES) * 2  # interleaved, 2 rounds
    for r in rows:
        assert int(r["real_tokens"]) <= int(r["computed_tokens"]) and float(r["tokens_per_s"]) > 0
        assert (r["mode"] == "packed") <= (r["real_tokens"] == r["computed_tokens"])  # packing pads nothing
    assert "x padded" in (tmp_path / "out" / "table.md").read_text()
    assert "bench packed --quick" in json.loads((tmp_path / "out" / "run.json").read_text())["command"]


def test_documents_are_paragraphs_cut_at_max_len(tmp_path):
    docs = packed.read_documents(_docs(tmp_path / "docs"), max_len=100)
    assert b"short" in docs and b"x" in docs and max(len(d) for d in docs) == 100
    assert sum(d == b"y" * 100 for d in docs) == 3  # 300 bytes cut into 3


def test_bench_packed_refuses_packing_that_differs(tmp_path, monkeypatch):
    real = packed.as_packed

    def shuffled(docs):  # the documents' boundaries one token off
        tokens, cu = real(docs)
        cu[1] += 1
        return tokens, cu

    monkeypatch.setattr(packed, "as_packed", shuffled)
    with pytest.raises(SystemExit, match="verification failed"):
        main(["packed", "--quick", "--docs", str(_docs(tmp_path / "docs")), "--out", str(tmp_path / "out")])


def test_bench_parallel_quick(tmp_path):
    assert main(["parallel", "--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "parallel.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["kind"], r["T"], r["ranks"]) for r in rows} == {
        (kind, T, W) for kind in ("attention", "model") for T in ("2048", "4096") for W in ("1", "2")
    }
    verified = [float(r["verified_error"]) for r in rows if r["T"] == "2048"]
    assert len(verified) == 4 and max(verified) < 1e-4
    with open(tmp_path / "model.csv") as f:
        model = list(csv.DictReader(f))
    # what a rank exchanges grows with the ranks, not with the tokens
    assert [int(r["ranks"]) for r in model] == [1, 2, 4, 8, 16, 32, 64]
    assert float(model[2]["exchanged_kib"]) == 2 * float(model[1]["exchanged_kib"])
    assert json.loads((tmp_path / "run.json").read_text())["git_commit"]
