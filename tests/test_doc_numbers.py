"""Every measured number of BENCHMARKS.md and EXPERIMENTS.md comes from a committed file.

BENCHMARKS.md's tables are checked by tests/test_benchmarks_doc.py, and some of EXPERIMENTS.md's are
recomputed by tests/test_experiments_doc.py; this file checks the text around them and every table
of EXPERIMENTS.md. For each `## ` section (and the preamble before the first), every decimal number
of its text (outside BENCHMARKS.md's tables and code spans; "1.26x", "99.2%", "2.6e-5" and "12.1k"
included), every ratio of two or more digits ("455x") and every integer with a unit of time, rate or
memory ("805 us", "3083 tokens/s") must be, at the precision shown, one of:

- a number written in a committed file that the section names (a path under evidence/), or a
  fraction of one written as a percentage;
- a number of the paper's tables, as the experiment modules hold them (PAPER below);
- in a table, a ratio ("1.92x") of two numbers of its row;
- a DERIVED entry: a formula over numbers of those files (its decimals are looked up there; its
  integers are sizes and counts), evaluated here (a ratio, a difference, a size in bytes);
- a QUOTED entry: a number that is not this project's measurement (the paper's text, a hardware
  fact), with where it comes from.

Other integers are not checked (they are mostly sizes, counts, dates and steps). Being found among a
source's numbers is a necessary condition, not a proof: a wrong number passes where the files hold
a near one by chance (integers and short decimals in big logs most easily), which is why the tables
whose numbers matter most are also recomputed column by column by the other two test files. A DERIVED or QUOTED entry
that no longer occurs in its section fails too, so the lists cannot go stale."""

from __future__ import annotations

import ast
import functools
import gzip
import operator
import re
from pathlib import Path

import numpy as np
import pytest

from linear_transformers.experiments.image import PAPER_BPD, PAPER_IMAGES_PER_S
from linear_transformers.experiments.speech import PAPER_PER

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("BENCHMARKS.md", "EXPERIMENTS.md")

# a decimal number with its optional exponent and unit-like suffix ("1.26x", "99.2%", "2.6e-5",
# "12.1k"), a ratio of two or more digits ("455x", not "28x28"), or an integer measurement with its
# unit ("202 ms", "117 GFLOP/s", "3083 tokens/s")
NUMBER = re.compile(
    r"(?<![\w.,])(\d+\.\d+|\d{2,}(?=x(?![\w\d]))|\d{2,}(?= (?:ms|us|GFLOP/s|tokens/s|tok/s|images/s|MiB|GiB|MB)\b))"
    r"(?:e(-?\d+))?(?=([%xk]?))(?![\d.])"
)
SOURCE_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
SOURCE = re.compile(r"evidence/[\w./-]*[\w/]")
# a tool's version ("gcc 12.2", "torch 2.13.0+cpu"), not a measurement
VERSION = re.compile(
    r"\b(?:gcc|clang|torch|Triton|transformers|Python|CUDA|llama-cpp-python|fla-core|peft|ONNX) \d+(?:\.\d+)+"
)

PAPER = [*PAPER_PER.values()] + [
    v for table in (PAPER_BPD, PAPER_IMAGES_PER_S) for row in table.values() for v in row.values()
]

# (doc, section title start, the number as shown, a formula over source numbers)
DERIVED: list[tuple[str, str, str, str]] = [
    ("BENCHMARKS.md", "The paper's Figure 1", "6.3x", "11.51 / 1.83"),
    ("BENCHMARKS.md", "The paper's Figure 1", "4.1x", "6253.13 / 1527.24"),
    ("BENCHMARKS.md", "The paper's Figure 1", "455x", "90061.74 / 197.94"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "3.6x", "46.3996 / 12.9004"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.67x", "7.06 / 4.24"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "0.19%", "(24.2033 / 24.1566 - 1) * 100"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "0.03", "(24.1633 / 24.1566 - 1) * 100"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "0.07%", "(24.1725 / 24.1566 - 1) * 100"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.62x", "7.052 / 4.345"),
    (
        "BENCHMARKS.md",
        "A linearised SmolLM2",
        "18.4",
        "(30 * 9 * (128 * 64 + 128 + 68 * 64 * 2)) * 4 / 1e6",
    ),
    ("BENCHMARKS.md", "A linearised SmolLM2", "17.7", "30 * 9 * 128 * 64 * 4 * 2 / 1e6"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "2.9", "30 * 3 * 64 * 64 * 4 * 2 / 1e6"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "0.41%", "(24.256 / 24.157 - 1) * 100"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "2.2x", "0.615 / 0.285"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "22.9x", "134.9 / 5.9"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "2.2", "30 * 9 * 64 * 64 * 2 / 1e6"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.63x", "7.661 / 4.709"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.65x", "7.914 / 4.795"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.65x", "8.1761 / 4.9474"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.51x", "8.1639 / 5.3945"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.62x", "7.7809 / 4.8099"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.71x", "7.727 / 4.511"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "10.0x", "50.8932 / 5.0644"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "35x", "183.0424 / 5.1847"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.65x", "7.1374 / 4.319"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "21", "30 * 9 * 128 * 64 * 4 * 2 / 1e6 + 30 * 3 * 64 * 64 * 4 * 2 / 1e6"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.80x", "7.143 / 3.976"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "2.40", "7.1712 - 4.768"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.44x", "28.3581 / 19.6996"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "4.18x", "80.4789 / 19.2341"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.81x", "19.946 / 11.0408"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "6.21x", "69.4397 / 11.1871"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "53", "2 * 1536 * 576 * 30 / 1e6"),
    (
        "BENCHMARKS.md",
        "A linearised SmolLM2",
        "20.6",
        "30 * 9 * 128 * 64 * 4 * 2 / 1e6 + 30 * 3 * 64 * 64 * 4 * 2 / 1e6",
    ),
    ("BENCHMARKS.md", "The attention kernel on the Xeon", "1.72", "4.34 / 2.53"),
    ("BENCHMARKS.md", "The attention kernel on the Xeon", "1.85x", "16.17 / 8.75"),
    ("BENCHMARKS.md", "The attention kernel on the Xeon", "35.8", "44.53 - 8.75"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "0.98", "4.3534 - 3.376"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.56x", "11.1996 / 7.1712"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.61x", "10.595 / 6.572"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "8.08x", "57.5466 / 7.1205"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "27.75x", "198.2393 / 7.1444"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "13.0x", "53.782 / 4.1467"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "32.7x", "127.2219 / 3.8961"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "3.1x", "47.968 / 15.6"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "4.5x", "44.3698 / 9.7618"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "5.9x", "43.1855 / 7.2727"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "4.9x", "47.968 / 9.691"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "7.8x", "44.3698 / 5.6673"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "11.1x", "43.1855 / 3.8961"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.53x", "6.289 / 4.111"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "1.42x", "4.111 / 1.106 / 2.616"),
    ("BENCHMARKS.md", "A linearised SmolLM2", "0.47%", "(26.497 / 26.373 - 1) * 100"),
    ("BENCHMARKS.md", "Training a whole model", "1.29x", "23863 / 18556"),
    ("BENCHMARKS.md", "Training a whole model", "0.99x", "6213 / 6246"),
    ("BENCHMARKS.md", "Training a whole model", "1.27x", "21710 / 17055"),
    ("BENCHMARKS.md", "bfloat16 in the C kernel", "1.26x", "29.8 / 23.7"),
    ("BENCHMARKS.md", "bfloat16 in the C kernel", "1.54x", "70.9 / 46.1"),
    ("BENCHMARKS.md", "GPU: the Triton kernels", "1.42", "4.553 / 3.198"),
    ("BENCHMARKS.md", "GPU: the Triton kernels", "1.97x", "2.170 / 1.102"),
    ("BENCHMARKS.md", "GPU: the Triton kernels", "2.0x", "2.194 / 1.102"),
    ("BENCHMARKS.md", "GPU: the Triton kernels", "10.8x", "34.509 / 3.198"),
    ("BENCHMARKS.md", "GPU: the Triton kernels", "0.9", "1.210 - 0.336"),
    ("EXPERIMENTS.md", "Image generation", "0.069", "2.272556227958402 - 2.2040065479773228"),
    ("EXPERIMENTS.md", "Image generation", "0.124", "0.745 - 0.621"),
    ("EXPERIMENTS.md", "Image generation", "0.101", "0.745 - 0.644"),
    ("EXPERIMENTS.md", "Image generation", "0.035", "2.1537 - 2.1183"),
    ("EXPERIMENTS.md", "Image generation", "0.8", "3000 * 16 / 60000"),
    ("EXPERIMENTS.md", "Image generation", "7.6x", "233.26 / 30.51"),
    ("EXPERIMENTS.md", "Image generation", "0.240", "2.2040065479773228 - 1.9642381343331394"),
    ("EXPERIMENTS.md", "Image generation", "6.4", "24000 * 16 / 60000"),
    ("EXPERIMENTS.md", "Image generation", "0.063", "1.8904908476872275 - 1.8279122389404248"),
    (
        "EXPERIMENTS.md",
        "Image generation",
        "0.063",
        "(1.827912238940 - 1.768925980753 + 1.835533783872 - 1.769212983817) / 2",
    ),
    ("EXPERIMENTS.md", "Image generation", "7.4x", "245.7676242218097 / 32.9968202119784"),
    ("EXPERIMENTS.md", "Image generation", "0.128", "1.8448 - 1.7165"),
    ("EXPERIMENTS.md", "Image generation", "0.045", "(2.243 - 2.204 + 2.225 - 2.175) / 2"),
    ("EXPERIMENTS.md", "Speech recognition", "1.92x", "43.02673413599996 / 22.417016284000056"),
    ("EXPERIMENTS.md", "Speech recognition", "1.88x", "43.10984446389993 / 22.89959270139989"),
    ("EXPERIMENTS.md", "Speech recognition", "1.82x", "30.346741658599786 / 16.696664469500682"),
    ("EXPERIMENTS.md", "Speech recognition", "1.87x", "28.663105758100574 / 15.347137591001228"),
    ("EXPERIMENTS.md", "Speech recognition", "2.1", "53.511868533171025 - 51.44248326232501"),
    ("EXPERIMENTS.md", "Speech recognition", "3.1", "44.26049908703591 - 41.168594035301275"),
    ("EXPERIMENTS.md", "Linearising SmolLM2", "1.111", "24.5295985320678 / 22.077097074991848"),
    ("EXPERIMENTS.md", "Image generation", "0.191", "2.1704 - 1.9798"),
    ("EXPERIMENTS.md", "Image generation", "0.152", "1.9218 - 1.7694"),
    ("EXPERIMENTS.md", "Image generation", "0.115", "1.8150 - 1.7004"),
    ("EXPERIMENTS.md", "Linearising SmolLM2", "6.8", "(13.932329698489289 / 13.049998927766659 - 1) * 100"),
]

# (doc, section title start, the number as shown, where it comes from)
QUOTED: list[tuple[str, str, str, str]] = [
    ("BENCHMARKS.md", "A linearised SmolLM2", "20x", "the target of the issue: >= 20x the teacher at 16k"),
    ("BENCHMARKS.md", "GPU: the Triton kernels", "20", "the target of the issue: a decode step under 20 us per layer"),
]


def sections(doc: str) -> list[tuple[str, str]]:
    """(title, text) of every `## ` section of a document, the preamble before them included (titled
    by the document's `# ` heading)."""
    parts = re.split(r"\n(?=## )", (ROOT / doc).read_text())
    return [(p.split("\n", 1)[0].removeprefix("## ").removeprefix("# "), p) for p in parts]


def prose(text: str, tables: bool = False) -> str:
    """The section without code spans, indented code and image or link targets, and without its
    tables unless `tables` (BENCHMARKS.md's tables are checked by tests/test_benchmarks_doc.py)."""
    drop = ("    ",) if tables else ("|", "    ")
    lines = [line for line in text.splitlines() if not line.startswith(drop)]
    text = "\n".join(lines)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(VERSION, " ", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def source_numbers(text: str) -> list[float]:
    """The numbers of every committed file the section names: a path under evidence/, or a folder
    of evidence/experiments or evidence/bench named by itself in a code span (`copy-paper/`)."""
    names = set(SOURCE.findall(text))
    for short in re.findall(r"`([\w.-]+)/`", text):
        names |= {f"evidence/{kind}/{short}" for kind in ("experiments", "bench")}
    values: list[float] = []
    for name in sorted(names):
        path = ROOT / name
        if not path.exists():
            continue
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f.is_file() and f.name.endswith((".csv", ".md", ".json", ".txt", ".log", ".csv.gz")):
                values += numbers_of_file(f)
    return values


@functools.cache
def numbers_of_file(path: Path) -> list[float]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [float(m) for m in SOURCE_NUMBER.findall(raw.decode(errors="replace"))]


def shown(match: re.Match) -> tuple[float, float]:
    """The value a number shows and half a unit of its last digit."""
    digits, exponent, suffix = match.group(1), match.group(2), match.group(3)
    scale = 10.0 ** int(exponent or 0) * (1000.0 if suffix == "k" else 1.0)
    decimals = len(digits.partition(".")[2])
    return float(digits) * scale, 0.5 * 10.0**-decimals * scale * (1 + 1e-9)


def found(value: float, half: float, values: np.ndarray, percent: bool) -> bool:
    """Is a value within half a unit of one of the sorted absolute source values (or, for a
    percentage, of one of them times 100)?"""
    for scale in (1.0, 100.0) if percent else (1.0,):
        i = np.searchsorted(values, (value - half) / scale)
        if i < len(values) and values[i] * scale <= value + half:
            return True
    return False


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def row_ratios(line: str) -> np.ndarray:
    """The quotients of every two numbers of a table row that are not themselves ratios."""
    plain = [float(m.group(1)) for m in re.finditer(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\d.x])", line)]
    return np.sort(np.array([a / b for a in plain for b in plain if b] or [0.0]))


def evaluate(formula: str) -> float:
    """A formula of numbers, + - * / and parentheses (nothing else is allowed)."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"not allowed in a formula: {ast.dump(node)}")

    return walk(ast.parse(formula, mode="eval"))


def entries(table: list, doc: str, title: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d, start, number, what in table:
        if d == doc and title.startswith(start):
            out.setdefault(number, []).append(what)
    return out


CASES = [(doc, title) for doc in DOCS for title, _ in sections(doc)]


@pytest.mark.parametrize(("doc", "title"), CASES, ids=[f"{d}:{t[:40]}" for d, t in CASES])
def test_every_number_in_the_prose_comes_from_a_file(doc, title):
    text = dict(sections(doc))[title]
    values = np.sort(np.abs(np.array(source_numbers(text) + PAPER)))
    derived, quoted = entries(DERIVED, doc, title), entries(QUOTED, doc, title)
    body = prose(text, tables=doc == "EXPERIMENTS.md")
    missing, used = [], set()
    for m in NUMBER.finditer(body):
        as_shown = m.group(0) + m.group(3)
        value, half = shown(m)
        line = body[body.rfind("\n", 0, m.start()) + 1 : body.find("\n", m.end())]
        if as_shown.endswith("x") and line.startswith("|") and found(value, half, row_ratios(line), False):
            continue  # (a ratio of two numbers of its table row)
        if as_shown in quoted or m.group(0) in quoted:
            used.add(as_shown if as_shown in quoted else m.group(0))
            continue
        formulas = derived.get(as_shown, []) + derived.get(m.group(0), [])
        if formulas:
            used.add(as_shown if as_shown in derived else m.group(0))
            for formula in formulas:  # (its measured operands: sizes and counts, integers, are not looked up)
                for literal in (x for x in SOURCE_NUMBER.findall(formula) if "." in x):
                    assert found(float(literal), 1e-12 + abs(float(literal)) * 1e-12, values, False), (
                        f"{doc} '{title}': {literal} in the formula for {as_shown} is in none of its sources"
                    )
            if any(abs(abs(evaluate(f)) - value) <= half for f in formulas):
                continue
            missing.append(f"{as_shown} (formula gives {[round(evaluate(f), 6) for f in formulas]})")
            continue
        if not found(value, half, values, m.group(3) == "%"):
            context = body[max(0, m.start() - 50) : m.end() + 20].replace("\n", " ")
            missing.append(f"{as_shown}: ...{context}...")
    assert not missing, f"{doc} '{title}': numbers from no committed file:\n" + "\n".join(missing)
    stale = sorted((set(derived) | set(quoted)) - used)
    assert not stale, f"{doc} '{title}': DERIVED/QUOTED entries no longer in the text: {stale}"
