"""Where every table of BENCHMARKS.md comes from. Each table (found by its header row, in order) is
listed in TABLES with its source: a committed file or folder under evidence/ (which must exist and be
named in its section above the table), "summary" (a targets table whose cells quote the tables above
it). Runs whose files were never kept live in docs/bench/*-history.md, not here. A new table fails
test_every_table_has_a_known_source until its source is decided. Every number of a table with a
committed source must be found, at the precision shown, among the numbers of its source's files;
the tables whose sources are CSVs written by `bench linearized` are also recomputed from them,
number by number."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "evidence" / "bench"
DOC = (ROOT / "BENCHMARKS.md").read_text()
LINES = DOC.splitlines()

SUMMARY = "summary"

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
    ("N", "evidence/bench/attention-2026-12-07-amd/"),
    ("target", SUMMARY),
    ("backend", "evidence/bench/dispatch-2026-12-02"),
    ("N", "evidence/bench/figure1-2026-12-07-amd/"),
    ("N", "evidence/bench/figure1-2026-12-07-amd/"),
    ("method", "evidence/bench/generate-tables-2026-12-07-amd/"),
    ("method", "evidence/bench/generate-tables-2026-12-07-amd/"),
    ("config", "evidence/bench/generate-tables-2026-12-07-amd/"),
    ("config", "evidence/bench/generate-tables-2026-12-07-amd/"),
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
    ("format", "evidence/bench/linearized-maps-2026-12-07-amd/"),
    ("domain", "evidence/bench/linearized-maps-2026-12-07-amd/"),
    ("format", "evidence/bench/linearized-maps-2026-12-07-amd/"),
    ("format", "evidence/bench/linearized-python-2026-12-07-amd/"),
    ("decoder", "evidence/bench/linearized-python-2026-12-07-amd/"),
    ("format", "evidence/bench/linearized-prefetch-2026-12-08-amd/"),
    ("decoder", "evidence/bench/linearized-prefetch-2026-12-08-amd/"),
    ("format", "evidence/bench/linearized-2026-12-08-xeon/"),
    ("decoder", "evidence/bench/linearized-2026-12-08-xeon/"),
    ("decoder", "evidence/bench/linearized-llamacpp-2026-12-08-xeon/"),
    ("B", "evidence/bench/linearized-tiles-2026-12-08-xeon/"),
    ("layers", "evidence/bench/hf-2026-12-02/"),
    ("arm", "evidence/bench/training-2026-12-07-amd/"),
    ("N", "evidence/bench/attention-f32-2026-12-07-amd/"),
    ("target", SUMMARY),
    ("N", "evidence/bench/attention-bf16-2026-12-07-amd/"),
    ("N", "evidence/bench/attention-f32-2026-12-08-xeon/"),
    ("N", "evidence/bench/attention-bf16-2026-12-08-xeon/bench/"),
    ("N", "evidence/bench/attention-bf16-2026-12-08-xeon/"),
    ("target", SUMMARY),
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
    if source == SUMMARY:
        return
    assert (ROOT / source).exists(), source
    line = doc_tables()[index][0]
    section = max(i for i in range(line) if LINES[i].startswith("## "))
    assert source.rstrip("/") in "\n".join(LINES[section:line]), f"{source} is not named in its section above it"


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\d.])")  # (a ratio "1.58x" is 1.58)
SOURCE_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def numbers_in(source: str) -> list[float]:
    """Every number written in a source: the file, or the CSV, Markdown, JSON and text files under it."""
    path = ROOT / source
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in (".csv", ".md", ".json", ".txt")]
    return [float(m) for f in files for m in SOURCE_NUMBER.findall(f.read_text())]


def shown_as(cell: str, values: list[float]) -> bool:
    """Is some value of the source, rounded to the cell's decimals, the number the cell shows?"""
    digits = len(cell.partition(".")[2])
    return any(abs(v - float(cell)) <= 0.5 * 10**-digits * (1 + 1e-9) for v in values)


def row_ratios(row: list[str]) -> list[float]:
    """The quotients of every two numbers of a row that are not themselves ratios ("1.58x")."""
    plain = [float(m.group()) for cell in row[1:] for m in NUMBER.finditer(cell) if cell[m.end() : m.end() + 1] != "x"]
    return [a / b for a in plain for b in plain if b]


# sources whose tables are recomputed from their CSVs column by column by a test below instead
F32_TABLES = ("evidence/bench/attention-f32-2026-12-07-amd/", "evidence/bench/attention-f32-2026-12-08-xeon/")
BF16_TABLES = ("evidence/bench/attention-bf16-2026-12-07-amd/", "evidence/bench/attention-bf16-2026-12-08-xeon/bench/")
RECOMPUTED = (*F32_TABLES, *BF16_TABLES)


@pytest.mark.parametrize("index", range(len(TABLES)))
def test_every_number_of_a_table_is_in_its_source(index):
    _, source = TABLES[index]
    if source in (SUMMARY, *RECOMPUTED):
        return
    values = numbers_in(source)
    _, _, rows = doc_tables()[index]
    missing = []
    for row in rows:
        for cell in row[1:]:
            for m in NUMBER.finditer(cell):
                ratio = cell[m.end() : m.end() + 1] == "x"  # (a ratio may be of two numbers of its row)
                if not shown_as(m.group(), values + (row_ratios(row) if ratio else [])):
                    missing.append(m.group())
    assert not missing, f"table {index} ({TABLES[index][0]!r}): numbers not in {source}: {missing}"


def attention_rows(folder: str) -> dict[tuple[str, int], dict[str, float]]:
    rows = rows_of(ROOT / folder / "attention.csv")
    return {
        (r["impl"], int(r["N"])): {k: float(v) for k, v in r.items() if v and k.endswith(("_ms", "_mib"))} for r in rows
    }


@pytest.mark.parametrize("folder", F32_TABLES)
def test_float32_kernel_table_equals_its_csv(folder):
    _, table = table_from(folder)
    by = attention_rows(folder)
    for row in table:
        k, c, s = (by[impl, int(row[0])] for impl in ("cpu", "chunked", "softmax"))
        want = [
            f"{k['fwdbwd_ms']:.1f} ({k['fwdbwd_min_ms']:.1f})",
            f"{c['fwdbwd_ms']:.1f}",
            f"{s['fwdbwd_ms']:.1f}",
            f"{c['fwd_ms'] / k['fwd_ms']:.2f}x / {c['fwdbwd_ms'] / k['fwdbwd_ms']:.2f}x",
            f"{s['fwdbwd_ms'] / k['fwdbwd_ms']:.1f}x",
        ]
        assert row[1:6] == want, row[0]


@pytest.mark.parametrize("folder", BF16_TABLES)
def test_bfloat16_kernel_table_equals_its_csv(folder):
    _, table = table_from(folder)
    by = attention_rows(folder)
    for row in table:
        k, f, c, s = (by[impl, int(row[0])] for impl in ("cpu", "cpu-f32", "chunked", "softmax"))
        want = [
            f"{k['fwdbwd_ms']:.1f}",
            f"{f['fwdbwd_ms']:.1f}",
            f"{f['fwd_ms'] / k['fwd_ms']:.2f}x",
            f"{f['fwdbwd_ms'] / k['fwdbwd_ms']:.2f}x",
            f"{c['fwdbwd_ms'] / k['fwdbwd_ms']:.1f}x",
            f"{s['fwdbwd_ms'] / k['fwdbwd_ms']:.1f}x",
            f"{k['fwdbwd_peak_mib']:.0f} / {f['fwdbwd_peak_mib']:.0f}",
        ]
        assert row[1:] == want, row[0]


def decode_cell(rows: dict, name: str, context: str) -> str:
    r = rows.get((name, context))
    return f"{float(r['decode_ms']):.1f} ({float(r['decode_ms_min']):.1f})" if r else ""


@pytest.mark.parametrize(
    ("folder", "n"),
    [
        ("evidence/bench/linearized-fused-2026-12-07-amd/", 0),
        ("evidence/bench/linearized-int8-dot-2026-12-07-amd", 0),
        ("evidence/bench/linearized-python-2026-12-07-amd/", 1),
        ("evidence/bench/linearized-prefetch-2026-12-08-amd/", 1),
        ("evidence/bench/linearized-2026-12-08-xeon/", 1),
        ("evidence/bench/linearized-llamacpp-2026-12-08-xeon/", 0),
    ],
)
def test_linearized_decode_tables_equal_their_csvs(folder, n):
    header, table = table_from(folder, n)
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
        ("evidence/bench/linearized-maps-2026-12-07-amd/", 0),
        ("evidence/bench/linearized-python-2026-12-07-amd/", 0),
        ("evidence/bench/linearized-prefetch-2026-12-08-amd/", 0),
        ("evidence/bench/linearized-2026-12-08-xeon/", 0),
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
    [
        ("evidence/bench/linearized-fused-2026-12-07-amd/", 2),
        ("evidence/bench/linearized-int8-dot-2026-12-07-amd", 2),
        ("evidence/bench/linearized-maps-2026-12-07-amd/", 1),
    ],
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


def test_readme_demo_numbers_are_its_committed_run():
    """The README's `make demo` paragraph quotes the committed run: its bits/dim, its parameters and
    its times, as run.json holds them."""
    readme = (ROOT / "README.md").read_text()
    para = readme[readme.index("`make demo` on the project's") : readme.index("![digits generated by make demo]")]
    folder = re.search(r"evidence/demo-[\w-]+/", para).group()
    result = json.loads((ROOT / folder / "run.json").read_text())["result"]

    def min_s(seconds: float) -> str:
        return f"{int(seconds // 60)} min {round(seconds % 60)} s"

    flat = " ".join(para.split())
    assert f"**{result['test_bpd']:.3f} test bits/dim**" in flat
    assert f"{result['params_m']:.2f}M parameters" in flat and f"{result['step']} steps" in flat
    assert f"{min_s(result['seconds'])} in all" in flat and f"in {min_s(result['train_seconds'])}" in flat
