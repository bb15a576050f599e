"""The linearisation's results in one file: result.json and table.md of a folder whose subfolders
hold each run's result.json (stage 1 of `linearize`, stage 2 of `finetune`).

    linear-transformers linearize-summary evidence/experiments/linearize-smollm2

result.json takes each perplexity from the latest stage that measured it: `teacher_ppl`, `linear_ppl`,
`hybrid_ppl`, `window_only_ppl`, `teacher_lora_ppl` (the teacher fine-tuned the same way as the
students: `finetune --teacher`) (first domain) and the same under `second_domain`, with `stage`
saying which stage each came from, `tokens` and `cpu_hours` summed over the runs, and every run listed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .attention import PPL_KEYS

KEYS = ("teacher_ppl", "teacher_lora_ppl", "linear_ppl", "hybrid_ppl", "window_only_ppl")
MODE_OF = {key: mode for mode, key in PPL_KEYS.items()} | {"teacher_lora_ppl": "teacher"}


def summarize(folder: Path) -> dict:
    runs = []
    for path in sorted(folder.glob("*/result.json")):
        r = json.loads(path.read_text())
        mode = r["linearize"]["mode"] if r["linearize"] else "teacher"  # (finetune --teacher: the control)
        runs.append(
            {
                "run": path.parent.name,
                "stage": r.get("stage", 1),
                "mode": mode,
                "tokens": r["tokens"],
                "cpu_hours": r["cpu_hours"],
                "wall_seconds": r["wall_seconds"],
                "ppl": {k: r[k] for k in KEYS if k in r},
                "second_domain": {k: v for k, v in r["second_domain"].items() if k in KEYS},
            }
        )
    if not runs:
        raise FileNotFoundError(f"summary: no */result.json under {folder}")
    out: dict = {"second_domain": {}, "stage": {}, "runs": runs}
    for k in KEYS:
        candidates = [r for r in runs if k in r["ppl"]]
        # a run of the key's own mode first (a hybrid run also scores its window alone, untrained)
        own = [r for r in candidates if r["mode"] == MODE_OF.get(k)] or candidates
        if own:
            pick = max(own, key=lambda r: r["stage"])
            out[k], out["second_domain"][k] = pick["ppl"][k], pick["second_domain"].get(k)
            out["stage"][k] = f"{pick['run']} (stage {pick['stage']})"
    out["tokens"] = sum(r["tokens"] for r in runs)
    out["cpu_hours"] = round(sum(r["cpu_hours"] for r in runs), 3)
    return out


def table(result: dict) -> str:
    """Each model's perplexity on both domains, as a multiple of the teacher's and, where the control
    ran (`finetune --teacher`), of the teacher fine-tuned the same way."""
    refs = [("teacher", "teacher_ppl")] + [("teacher + LoRA", "teacher_lora_ppl")] * ("teacher_lora_ppl" in result)
    head = "| model | from | held-out ppl | second domain ppl |"
    for name, _ in refs:
        head += f" x {name} | x {name}, second domain |"
    lines = [head, "|---|---|---:|---:|" + "---:|---:|" * len(refs)]
    for k in KEYS:
        if k in result:
            a, b = result[k], result["second_domain"][k]
            row = f"| {k[:-4]} | {result['stage'].get(k, '')} | {a:.2f} | {b:.2f} |"
            for _, ref in refs:
                row += f" {a / result[ref]:.3f} | {b / result['second_domain'][ref]:.3f} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder whose subfolders hold each run's result.json")


def main(args: argparse.Namespace) -> int:
    folder = args.folder
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of linearisation runs")
    result = summarize(folder)
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "table.md").write_text(table(result))
    print(table(result))
    return 0
