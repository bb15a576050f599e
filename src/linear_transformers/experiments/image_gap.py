"""The gap between linear and softmax attention on image generation, across runs of `experiment image`:
for each arm (a change to the model or its training) and seed, the held-out bits/dim of both against
the training steps, the final test bits/dim on all test images, and the gap, linear minus softmax.

    linear-transformers experiment image-gap --runs baseline=evidence/experiments/image-mnist-equal-steps \\
        post-ln=evidence/experiments/mnist-gap/post-ln hedgehog=evidence/experiments/mnist-gap/hedgehog,\\
evidence/experiments/image-mnist-equal-steps --out evidence/experiments/mnist-gap

Each run is NAME=FOLDER[,SOFTMAX_FOLDER]: FOLDER holds linear/ (and softmax/ unless SOFTMAX_FOLDER
names the folder whose softmax/ is the comparison, for an arm that changes linear attention only);
the seed is read from the runs' settings. Writes gap.csv (every curve point), table.md and gap.png
(the gap against steps, one line per arm and seed) under --out.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from ..options import add_options, from_args, option
from ..results import markdown_table, write_csv


@dataclass
class GapSettings:
    runs: tuple[str, ...] = option((), "NAME=FOLDER[,SOFTMAX_FOLDER] for each arm and seed (see above)")
    out: Path = option(Path("results/image-gap"), "where gap.csv, table.md and gap.png go")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, GapSettings, title="image-gap")


def curve(folder: Path, method: str) -> dict[int, float]:
    """Held-out bits/dim by step of one method's run (its log.csv, or the committed log.csv.gz)."""
    run = folder / method / "run"
    log = next((p for p in (run / "log.csv", run / "log.csv.gz") if p.exists()), None)
    if log is None:
        raise FileNotFoundError(f"image-gap: {run} has no log.csv(.gz): is {folder} a folder of experiment image?")
    text = gzip.decompress(log.read_bytes()).decode() if log.suffix == ".gz" else log.read_text()
    return {
        int(r["step"]): float(r["test_bits_per_dim"])
        for r in csv.DictReader(text.splitlines())
        if r["test_bits_per_dim"]
    }


def final(folder: Path, method: str) -> tuple[float, dict]:
    """(test bits/dim on the final evaluation, the run's settings) from its result.json."""
    path = folder / method / "result.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"image-gap: {path} is missing: is {folder} a finished run of experiment image with {method}?"
        )
    saved = json.loads(path.read_text())
    (row,) = [r for r in saved["rows"] if r["method"] == method]
    return float(row["test_bpd"]), saved["settings"]


def gather(runs: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """(curve rows, final rows) of every run spec."""
    points, finals = [], []
    for spec in runs:
        name, sep, folders = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"image-gap: a run is NAME=FOLDER[,SOFTMAX_FOLDER], got {spec!r}")
        linear_folder, _, softmax_folder = folders.partition(",")
        lin_dir, soft_dir = Path(linear_folder), Path(softmax_folder or linear_folder)
        lin_final, settings = final(lin_dir, "linear")
        soft_final, soft_settings = final(soft_dir, "softmax")
        seed = settings.get("seed", 0)
        if soft_settings.get("seed", 0) != seed or soft_settings.get("steps") != settings.get("steps"):
            raise ValueError(f"image-gap: {name}: the softmax run differs in seed or steps from the linear run")
        lin, soft = curve(lin_dir, "linear"), curve(soft_dir, "softmax")
        for step in sorted(set(lin) & set(soft)):
            points.append(
                {
                    "arm": name,
                    "seed": seed,
                    "step": step,
                    "softmax": soft[step],
                    "linear": lin[step],
                    "gap": lin[step] - soft[step],
                }
            )
        finals.append(
            {
                "arm": name,
                "seed": seed,
                "steps": settings.get("steps"),
                "softmax": soft_final,
                "linear": lin_final,
                "gap": lin_final - soft_final,
                "norm": settings.get("norm", "pre"),
                "feature_map": settings.get("feature_map", "elu"),
                "heads": settings.get("n_heads"),
                "schedule": settings.get("schedule"),
            }
        )
    return points, finals


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, seed in dict.fromkeys((p["arm"], p["seed"]) for p in points):
        pts = [p for p in points if p["arm"] == arm and p["seed"] == seed]
        ax.plot(
            [p["step"] for p in pts],
            [p["gap"] for p in pts],
            label=f"{arm}, seed {seed}",
            linestyle="-" if seed == 0 else "--",
        )
    ax.axhline(0.023, color="k", linewidth=0.8, linestyle=":", label="the paper's gap (Table 1)")
    ax.set_xscale("log")  # (runs of 3000 and of 24,000 steps side by side)
    ax.set_xlabel("training steps")
    ax.set_ylabel("linear - softmax, held-out bits/dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    s = from_args(GapSettings, args)
    if not s.runs:
        raise ValueError("image-gap: name the runs (--runs NAME=FOLDER ...)")
    points, finals = gather(s.runs)
    s.out.mkdir(parents=True, exist_ok=True)
    write_csv(s.out / "gap.csv", points)
    rows = [
        [
            f["arm"],
            str(f["seed"]),
            str(f["steps"]),
            f["norm"],
            f["feature_map"],
            str(f["heads"]),
            str(f["schedule"]),
            f"{f['softmax']:.3f}",
            f"{f['linear']:.3f}",
            f"{f['gap']:+.3f}",
        ]
        for f in finals
    ]
    header = ["arm", "seed", "steps", "norm", "feature map", "heads", "schedule", "softmax", "linear", "gap"]
    table = "Test bits/dim on all test images, linear - softmax (the paper: +0.023)\n\n" + markdown_table(header, rows)
    (s.out / "table.md").write_text(table + "\n")
    plot(points, s.out / "gap.png")
    print(table)
    print(f"wrote {s.out / 'gap.csv'}, {s.out / 'table.md'}, {s.out / 'gap.png'}")
    return 0
