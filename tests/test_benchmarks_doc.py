"""Where every table of BENCHMARKS.md comes from. Each table (found by its header row, in order) is
listed in TABLES with its source: a committed file or folder under evidence/ (which must exist and be
named in its section above the table), "summary" (a targets table whose cells quote the tables above
it), or "uncommitted: why" for runs whose files were never kept (older runs, said in the text). A new
table fails test_every_table_has_a_known_source until its source is decided. The tables whose
sources are CSVs written by `bench linearized` are also recomputed from them, number by number."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "evidence" / "bench"
DOC = (ROOT / "BENCHMARKS.md").read_text()
LINES = DOC.splitlines()

SUMMARY = "summary"
OLD_RUN = "uncommitted: a run of 2026-11-27/28 that wrote to the ignored results/ (said in the text)"

# (the table's first column header, its source), in the order of BENCHMARKS.md
TABLES = [
    ("level", "evidence/bench/isa-levels-2026-12-02/"),
    ("level", "evidence/bench/isa-levels-2026-12-02/generate"),
    ("level", "evidence/bench/isa-levels-2026-12-02/attention-run2/"),
    ("target", SUMMARY),
    ("level", "evidence/bench/isa-levels-2026-12-02-amd/attention/"),
    ("level", "evidence/bench/isa-levels-2026-12-02-amd-auto"),
    ("level", "evidence/bench/isa-levels-2026-12-03-amd/"),
    ("forward, median (best) ms", "evidence/bench/threads-2026-12-03-amd/"),
    ("level", "evidence/bench/isa-levels-2026-12-03-amd-omp/"),
    ("level", "evidence/bench/generate-levels-2026-12-03-amd/"),
    ("N", OLD_RUN),
    ("target", SUMMARY),
    ("backend", "evidence/bench/dispatch-2026-12-02"),
    ("N", OLD_RUN),
    ("N", OLD_RUN),
    ("config", OLD_RUN),
    ("config", OLD_RUN),
    ("method", OLD_RUN),
    ("method", OLD_RUN),
    ("", "evidence/bench/generate-tables-2026-12-07-amd/"),
    ("target", SUMMARY),
    ("decoder", "evidence/bench/linearized-fused-2026-12-07-amd/"),
    ("format", "evidence/bench/linearized-fused-2026-12-07-amd/"),
    ("format", "evidence/bench/linearized-floor-2026-12-07-amd/"),
    ("domain", "evidence/bench/linearized-fused-2026-12-07-amd/"),
    ("format", "evidence/bench/linearized-c-call-2026-12-07-amd/"),
    ("format", "evidence/bench/linearized-own-loop-2026-12-07-amd"),
    ("top-k", "evidence/bench/linearized-own-loop-2026-12-07-amd"),
    ("decoder", "evidence/bench/linearized-int8-dot-2026-12-07-amd"),
    ("format", "evidence/bench/linearized-int8-dot-2026-12-07-amd"),
    ("domain", "evidence/bench/linearized-int8-dot-2026-12-07-amd"),
    ("top-k", "evidence/bench/linearized-int8-dot-2026-12-07-amd"),
    ("layers", "evidence/bench/hf-2026-12-02/"),
    ("arm", "evidence/bench/training-2026-12-07-amd/"),
    ("N", "evidence/bench/attention-f32-2026-12-07-amd/"),
    ("target", SUMMARY),
    ("N", "evidence/bench/attention-bf16-2026-12-07-amd/"),
    ("forward products", "evidence/bench/attention-bf16-2026-12-07-amd/before-7927842/"),
    ("bfloat16, D=64, N", "evidence/bench/gpu_h200.csv"),
]


def cells(line: str) -> list[str]:
    return [c.strip().strip("*") for c in line.strip().strip("|").split("|")]


def doc_tables() -> list[tuple[int, list[str], list[list[str]]]]:
    """Every table of BENCHMARKS.md: (its header's line index, header cells, rows of cells)."""
    found = []
    for i, line in enumerate(LINES):
        starts = line.startswith("|") and (i == 0 or not LINES[i - 1].startswith("|"))
        if starts and i + 1 < len(LINES) and LINES[i + 1].startswith("|---"):
            j, rows = i + 2, []
            while j < len(LINES) and LINES[j].startswith("|"):
                rows.append(cells(LINES[j]))
                j += 1
            found.append((i, cells(line), rows))
    return found


def table_from(source: str, n: int = 0) -> tuple[list[str], list[list[str]]]:
    """The n-th table whose source is `source` (header cells, rows)."""
    hits = [t for t, (_, s) in zip(doc_tables(), TABLES, strict=False) if s == source]
    return hits[n][1], hits[n][2]


def rows_of(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_every_table_has_a_known_source():
    found = [header[0] for _, header, _ in doc_tables()]
    assert found == [first for first, _ in TABLES], "a table of BENCHMARKS.md was added, removed or moved"


@pytest.mark.parametrize("index", range(len(TABLES)))
def test_a_committed_source_exists_and_is_named_above_its_table(index):
    _, source = TABLES[index]
    if source == SUMMARY or source.startswith("uncommitted: "):
        return
    assert (ROOT / source).exists(), source
    line = doc_tables()[index][0]
    section = max(i for i in range(line) if LINES[i].startswith("## "))
    assert source.rstrip("/") in "\n".join(LINES[section:line]), f"{source} is not named in its section above it"


def decode_cell(rows: dict, name: str, context: str) -> str:
    r = rows.get((name, context))
    return f"{float(r['decode_ms']):.1f} ({float(r['decode_ms_min']):.1f})" if r else ""


@pytest.mark.parametrize(
    "folder", ["evidence/bench/linearized-fused-2026-12-07-amd/", "evidence/bench/linearized-int8-dot-2026-12-07-amd"]
)
def test_linearized_decode_tables_equal_their_csvs(folder):
    header, table = table_from(folder, 0)
    rows = {(r["model"], r["context"]): r for r in rows_of(ROOT / folder / "linearized.csv") if r["decode_ms"]}
    names = {"student, PyTorch layers": "student, PyTorch step", "llama.cpp F32": "llama.cpp f32"}
    names |= {"llama.cpp BF16": "llama.cpp bf16", "llama.cpp Q8_0": "llama.cpp q8_0"}
    for row in table:
        name = names.get(row[0], row[0])
        assert row[1:] == [decode_cell(rows, name, c) for c in header[1:]], row[0]


def floor_columns(r: dict) -> dict[str, str]:
    return {
        "weights MB": f"{float(r['weight_mb']):.1f}",
        "floor ms": f"{float(r['floor_ms']):.2f}",
        "floor ms (median; min)": f"{float(r['floor_ms']):.2f} ({float(r.get('floor_min_ms') or 0):.2f})",
        "fused ms": f"{float(r['fused_ms']):.2f}",
        "through forward, ms": f"{float(r['fused_ms']):.2f}",
        "through transformers' forward, greedy": f"{float(r['fused_ms']):.2f}",
        "C call alone, ms": f"{float(r.get('c_call_ms') or 0):.2f}",
        "C call alone": f"{float(r.get('c_call_ms') or 0):.2f}",
        "own loop + C sampler, top-p 0.9": f"{float(r.get('own_loop_ms') or 0):.2f}",
    }


@pytest.mark.parametrize(
    ("folder", "n"),
    [
        ("evidence/bench/linearized-fused-2026-12-07-amd/", 1),
        ("evidence/bench/linearized-floor-2026-12-07-amd/", 0),
        ("evidence/bench/linearized-c-call-2026-12-07-amd/", 0),
        ("evidence/bench/linearized-own-loop-2026-12-07-amd", 0),
        ("evidence/bench/linearized-int8-dot-2026-12-07-amd", 1),
    ],
)
def test_linearized_floor_tables_equal_their_csvs(folder, n):
    """Every floor table: each column recomputed from floor.csv; each "x floor" column is the ratio
    the CSV gives for the time column before it."""
    header, table = table_from(folder, n)
    source = {r["format"]: r for r in rows_of(ROOT / folder / "floor.csv")}
    ratios = {"fused ms": "times_floor", "through forward, ms": "times_floor"}
    ratios |= {"through transformers' forward, greedy": "times_floor", "C call alone, ms": "c_call_times_floor"}
    ratios |= {"C call alone": "c_call_times_floor", "own loop + C sampler, top-p 0.9": "own_loop_times_floor"}
    for row in table:
        r, want = source[row[0]], floor_columns(source[row[0]])
        for k, (column, cell) in enumerate(zip(header[1:], row[1:], strict=True), start=1):
            if column == "x floor":
                assert cell == f"{float(r[ratios[header[k - 1]]]):.2f}", (row[0], k)
            else:
                assert cell == want[column], (row[0], column)


@pytest.mark.parametrize(
    ("folder", "n"),
    [("evidence/bench/linearized-fused-2026-12-07-amd/", 2), ("evidence/bench/linearized-int8-dot-2026-12-07-amd", 2)],
)
def test_linearized_perplexity_tables_equal_their_csvs(folder, n):
    header, table = table_from(folder, n)
    ppl = {(r["domain"], r["format"]): float(r["perplexity"]) for r in rows_of(ROOT / folder / "perplexity.csv")}
    for row in table:
        for column, cell in zip(header[1:], row[1:], strict=True):
            if " / " in column:
                a, b = column.split(" / ")
                assert cell == f"{ppl[row[0], a] / ppl[row[0], b]:.4f}", (row[0], column)
            else:
                assert cell == f"{ppl[row[0], column]:.3f}", (row[0], column)


@pytest.mark.parametrize(
    ("folder", "n"),
    [
        ("evidence/bench/linearized-own-loop-2026-12-07-amd", 1),
        ("evidence/bench/linearized-int8-dot-2026-12-07-amd", 3),
    ],
)
def test_sampler_tables_equal_their_csvs(folder, n):
    _, table = table_from(folder, n)
    ms = {(r["sampler"], r["top_k"], r["top_p"]): float(r["ms"]) for r in rows_of(ROOT / folder / "sampling.csv")}
    for row in table:
        c, t = ms["C sampler", row[0], row[1]], ms["transformers", row[0], row[1]]
        assert row[2:] == [f"{c:.3f}", f"{t:.3f}", f"{t / c:.1f}x"], row[:2]


def test_readme_quotes_its_headline_numbers_from_the_docs():
    """Every number in the README's Benchmarks and Experiments sections appears in BENCHMARKS.md or
    EXPERIMENTS.md (whose tables the tests above and tests/test_experiments_doc.py check against
    their files): the README restates, it does not measure."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Benchmarks")
    end = readme.index("\n## ", readme.index("## Experiments"))
    docs = DOC + (ROOT / "EXPERIMENTS.md").read_text()
    numbers = re.findall(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w.])", readme[start:end])
    missing = sorted({n for n in numbers if not re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", docs)})
    assert not missing, f"README numbers found in neither BENCHMARKS.md nor EXPERIMENTS.md: {missing}"
