"""The numbers in EXPERIMENTS.md's tables equal the committed files they come from (evidence/): each
table is found by its header, each row's numbers are recomputed from the CSV or JSON the program
wrote and rounded as the table rounds them. Runs whose files were never committed are recorded in
docs/experiments-history.md, not here."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "evidence" / "experiments"
DOC = (ROOT / "EXPERIMENTS.md").read_text()


def tables(header: str) -> list[list[list[str]]]:
    """Every table of EXPERIMENTS.md under this header row: its rows, as lists of cell texts."""
    lines, found = DOC.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == header:
            rows, j = [], i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append([c.strip().strip("*") for c in lines[j].strip().strip("|").split("|")])
                j += 1
            found.append(rows)
    assert found, f"EXPERIMENTS.md has no table with the header {header!r}"
    return found


def head(*columns: str) -> str:
    """A table's header row from its columns."""
    return "| " + " | ".join(columns) + " |"


def rows_of(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def test_mnist_tables_equal_their_csvs():
    first = ("method", "steps", "train min", "test bits/dim (10,000 images)")
    cases = [  # (header, which table of that header, folder)
        (head(*first, "paper bits/dim (28x28)", "images/s (16 at once)", "vs softmax"), 0, "image-mnist-equal-steps"),
        (head(*first, "at 3000 steps (above)", "images/s (16 at once)"), 0, "image-mnist-6000-steps"),
        (head(*first, "at 6000 steps", "at 3000 steps", "images/s (16 at once)"), 0, "image-mnist-24000-steps"),
    ]
    for header, n, folder in cases:
        source = {r["method"]: r for r in rows_of(EVIDENCE / folder / "image.csv")}
        checked = 0
        for row in tables(header)[n]:
            method = {"softmax, KV cache": "softmax-cache"}.get(row[0], row[0])
            if method not in source:
                continue
            r = source[method]
            if row[1].isdigit():
                assert row[1] == r["steps"], (folder, method)
            if "thread" not in row[2] and row[2]:  # (train min; a 2-thread note marks a separate process)
                assert row[2] == f"{float(r['train_seconds']) / 60:.1f}", (folder, method, "train min")
            assert row[3] == f"{float(r['test_bpd']):.3f}", (folder, method, "test bits/dim")
            checked += 1
        assert checked >= 2, f"{folder}: no row of the table matched the CSV's methods"


def test_mnist_curve_table_equals_its_logs():
    """The 24,000-step run's held-out curve, every 3000 steps, from its three training logs."""

    def curve(method: str) -> dict[int, float]:
        raw = gzip.decompress((EVIDENCE / "image-mnist-24000-steps" / method / "run" / "log.csv.gz").read_bytes())
        rows = csv.DictReader(io.StringIO(raw.decode()))
        return {int(r["step"]): float(r["test_bits_per_dim"]) for r in rows if r["test_bits_per_dim"]}

    softmax, linear, lsh = curve("softmax"), curve("linear"), curve("lsh-1")
    (table,) = tables(head("step", *(str(s) for s in range(3000, 24001, 3000))))
    steps = range(3000, 24001, 3000)
    want = {
        "softmax": [f"{softmax[s]:.3f}" for s in steps],
        "linear": [f"{linear[s]:.3f}" for s in steps],
        "gap": [f"{linear[s] - softmax[s]:+.3f}" for s in steps],
        "lsh-1": [f"{lsh[s]:.3f}" for s in steps],
        "lsh-1 - softmax": [f"{lsh[s] - softmax[s]:+.3f}" for s in steps],
    }
    assert {row[0]: row[1:] for row in table} == want


def test_speech_tables_equal_their_csvs():
    cases = [
        (
            "| method | params (M) | steps | epochs | s/epoch | vs softmax | test PER % | paper s/epoch (WSJ) |",
            0,
            "speech-wsj-length",
            {"s/epoch": 4, "test PER %": 6},
        ),
        (
            "| method | params (M) | steps | epochs | s/epoch | test PER % | paper PER % (WSJ) |",
            0,
            "speech-wsj-length-stack-3",
            {"s/epoch": 4, "test PER %": 5},
        ),
    ]
    for header, n, folder, columns in cases:
        source = {r["method"]: r for r in rows_of(EVIDENCE / folder / "speech.csv")}
        rows = tables(header)[n]
        assert {row[0] for row in rows} == set(source), folder
        for row in rows:
            r = source[row[0]]
            assert row[1] == f"{float(r['params_m']):.2f}" and row[2] == r["steps"], (folder, row[0])
            assert row[columns["s/epoch"]].replace(",", "") == f"{float(r['seconds_per_epoch']):.0f}", (folder, row[0])
            assert row[columns["test PER %"]] == f"{float(r['test_per']):.2f}", (folder, row[0])
        if "vs softmax" in header:  # the speed-up quoted in the text too
            ratio = float(source["softmax"]["seconds_per_epoch"]) / float(source["linear"]["seconds_per_epoch"])
            assert f"{ratio:.2f}x" in {row[5] for row in rows}


def test_speech_seeds_table_equals_its_csvs():
    folder = EVIDENCE / "speech-wsj-length-stack-3-seeds"
    header = head("method", "PER %, seed 0", "seed 1", "seed 2", "mean (min-max)", "PER - linear's PER [95% interval]")
    per = {(r["method"], int(r["seed"])): float(r["test_per"]) for r in rows_of(folder / "speech.csv")}
    boot = {r["method"]: r for r in rows_of(folder / "bootstrap.csv")}
    rows = tables(header)[0]
    assert {row[0] for row in rows} == {m for m, _ in per}
    for row in rows:
        runs = [per[row[0], k] for k in (0, 1, 2)]
        assert row[1:4] == [f"{x:.2f}" for x in runs], row[0]
        assert row[4] == f"{sum(runs) / 3:.2f} ({min(runs):.2f}-{max(runs):.2f})", row[0]
        if row[0] != "linear":
            b = {k: float(boot[row[0]][k]) for k in ("per_difference", "ci_low", "ci_high")}
            assert row[5] == f"{b['per_difference']:+.2f} [{b['ci_low']:+.2f}, {b['ci_high']:+.2f}]", row[0]


def test_speech_splice_table_equals_its_csvs():
    folder = EVIDENCE / "speech-wsj-length-splice-1"
    header = head("method", "steps", "s/epoch", "speed vs softmax", "test PER %", "PER - linear's [95% interval]")
    runs = {r["method"]: r for r in rows_of(folder / "speech.csv")}
    boot = {r["method"]: r for r in rows_of(folder / "bootstrap.csv")}
    softmax = float(runs["softmax"]["seconds_per_epoch"])
    for row in tables(header)[0]:
        r = runs[row[0]]
        speed = softmax / float(r["seconds_per_epoch"])
        assert row[1:5] == [
            r["steps"],
            f"{float(r['seconds_per_epoch']):.1f}",
            f"{speed:.2f}x".replace("1.00x", "1.0x"),
            f"{float(r['test_per']):.2f}",
        ]
        if row[0] != "linear":
            b = {k: float(boot[row[0]][k]) for k in ("per_difference", "ci_low", "ci_high")}
            assert row[5] == f"{b['per_difference']:+.2f} [{b['ci_low']:+.2f}, {b['ci_high']:+.2f}]"


def test_copy_table_equals_its_runs():
    header = head(
        "method",
        "seeds",
        "steps",
        "held-out loss, mean (min-max)",
        "held-out accuracy %, mean (min-max)",
        "steps to 99% held-out accuracy",
        "s/step",
    )
    for n, folder in enumerate(["copy", "copy-paper"]):  # the scaled-down task, then --paper's
        check_copy_table(tables(header)[n], EVIDENCE / folder / "copy.csv")


def check_copy_table(table: list[list[str]], source: Path) -> None:
    by_run: dict[tuple[str, str], list[dict]] = {}
    for r in rows_of(source):
        by_run.setdefault((r["method"], r["seed"]), []).append(r)
    assert {row[0] for row in table} == {m for m, _ in by_run}, source
    for row in table:
        runs = [rs for (m, _), rs in sorted(by_run.items()) if m == row[0]]
        assert len(runs) == int(row[1]), row[0]
        last = [rs[-1] for rs in runs]
        assert row[2] == last[0]["step"]
        losses = [float(r["eval_loss"]) for r in last]
        assert row[3] == f"{sum(losses) / len(losses):.4f} ({min(losses):.4f}-{max(losses):.4f})", row[0]
        acc = [100 * float(r["eval_accuracy"]) for r in last]
        assert row[4] == f"{sum(acc) / len(acc):.2f} ({min(acc):.2f}-{max(acc):.2f})", row[0]
        first = [next((r["step"] for r in rs if float(r["eval_accuracy"]) >= 0.99), None) for rs in runs]
        want = "not reached" if first == [None] * len(first) else " / ".join(f or "not reached" for f in first)
        assert row[5] == want, row[0]


def test_linearisation_table_equals_its_results():
    result = json.loads((EVIDENCE / "linearize-smollm2" / "result.json").read_text())
    header = (
        "| model (perplexity) | stage | tokens | CPU-h | held-out (python docs) | x teacher | second domain "
        "(debian-reference) | x teacher |"
    )
    rows = {row[0]: row for row in tables(header)[0]}
    t, t2 = result["teacher_ppl"], result["second_domain"]["teacher_ppl"]
    for name, key in [
        ("teacher (softmax)", "teacher_ppl"),
        ("hybrid, + LoRA", "hybrid_ppl"),
        ("window + sinks alone, + LoRA (no linear part)", "window_only_ppl"),
        ("pure linear, + LoRA", "linear_ppl"),
    ]:
        row, a, b = rows[name], result[key], result["second_domain"][key]
        assert (row[4], row[5]) == (f"{a:.2f}", f"{a / t:.3f}"), name
        assert (row[6], row[7]) == (f"{b:.2f}", f"{b / t2:.3f}"), name


def test_linearisation_by_context_table_equals_its_csv():
    rows = rows_of(EVIDENCE / "linearize-smollm2" / "context" / "context.csv")
    ppl = {(r["model"], r["domain"], r["context"]): float(r["ppl"]) for r in rows}
    spans = ["1-63", "64-127", "128-255", "256-511", "512-1023", "1024-2047"]
    table = tables(head("tokens of context", *spans))[0]
    names = {"teacher": "teacher", "teacher + LoRA": "teacher+LoRA", "hybrid (stage 1+2)": "hybrid"}
    names |= {"window-only, 459 steps": "window-only", "window-only, 360 steps": "window-only, 360 steps"}
    for row in table:
        if row[0] in names:
            want = [
                f"{ppl[names[row[0]], 'held_out', s]:.2f} / {ppl[names[row[0]], 'second_domain', s]:.2f}" for s in spans
            ]
        else:
            assert row[0] == "window-only (360) / hybrid"
            want = [
                " / ".join(
                    f"{ppl['window-only, 360 steps', d, s] / ppl['hybrid', d, s]:.3f}"
                    for d in ("held_out", "second_domain")
                )
                for s in spans
            ]
        assert row[1:] == want, row[0]
    assert len(table) == 6


def test_linearisation_trained_at_2048_table_equals_its_csv():
    rows = rows_of(EVIDENCE / "linearize-smollm2" / "context-2048-trained" / "context.csv")
    ppl = {(r["model"], r["domain"], r["context"]): float(r["ppl"]) for r in rows}
    spans = ["128-255", "256-511", "512-1023", "1024-2047"]
    table = tables(head("tokens of context", *spans))[0]
    assert len(table) == 2
    for row in table:
        model = row[0].replace(", stage 2 on 2048-token windows", ", 2048-token windows")
        assert row[1:] == [f"{ppl[model, 'held_out', s]:.2f} / {ppl[model, 'second_domain', s]:.2f}" for s in spans]
