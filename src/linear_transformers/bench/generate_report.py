"""bench generate's report: the summary table, the paper's Tables 1 and 2 side by side with ours, the plot of
the cost of a generation step against the position."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..results import fmt, markdown_table

PAPER = {  # the paper's generation speed (images/s on its GPU; Tables 1 and 2), side by side with ours
    ("mnist", "softmax-recompute"): 0.45,
    ("mnist", "lsh-1"): 0.68,
    ("mnist", "lsh-4"): 0.27,
    ("mnist", "linear-rnn"): 142.8,
    ("cifar", "softmax-recompute"): 0.004,
    ("cifar", "lsh-1"): 0.015,
    ("cifar", "lsh-4"): 0.005,
    ("cifar", "linear-rnn"): 17.85,
}


def summary(rows: list[dict], batch: int) -> str:
    out = []
    gen = [r for r in rows if "seconds_per_image" in r]
    table = ""
    for config in dict.fromkeys(r["config"] for r in gen):
        by = {(r["generator"], r["fixed_batch"]): r for r in gen if r["config"] == config}
        lin1, linb = by[("linear-rnn", False)], by[("linear-rnn", True)]
        for g in dict.fromkeys(r["generator"] for r in gen if r["config"] == config):
            r1, rb = by[(g, False)], by.get((g, True), by[(g, False)])
            note = "" if rb["batch"] == batch else f" (timed at batch {rb['batch']})"
            speedup_1 = fmt(lin1["images_per_s"] / r1["images_per_s"], 1) + "x"
            speedup_b = fmt(linb["images_per_s"] / rb["images_per_s"], 1) + "x"
            out.append(
                [
                    config,
                    g,
                    fmt(r1["seconds_per_image"], 3),
                    fmt(rb["images_per_s"], 2) + note,
                    speedup_1,
                    speedup_b,
                    str(rb["paper_images_per_s"] or "-"),
                ]
            )
    if out:
        table = markdown_table(
            [
                "config",
                "generator",
                "s/image, batch 1",
                f"images/s, batch {batch}",
                "linear speedup, batch 1",
                f"linear speedup, batch {batch}",
                "paper images/s",
            ],
            out,
        )
    whole = [r for r in rows if "whole_image_median_s" in r]
    table += "\n" + markdown_table(
        ["config", "generator", "whole images at batch 1: median s", "range s"],
        [
            [
                r["config"],
                r["generator"],
                fmt(r["whole_image_median_s"], 3),
                "-".join(fmt(f(map(float, r["whole_image_s"].split())), 3) for f in (min, max)),
            ]
            for r in whole
        ],
    )
    steps = [r for r in rows if "step_ms_fused" in r]
    table += "\n" + markdown_table(
        ["config", "batch", "RNN step, fused C: ms", "RNN step, PyTorch: ms", "PyTorch / fused"],
        [
            [
                r["config"],
                str(r["batch"]),
                fmt(r["step_ms_fused"], 3),
                fmt(r["step_ms_pytorch"], 3),
                fmt(r["step_ms_pytorch"] / r["step_ms_fused"], 2) + "x",
            ]
            for r in steps
        ],
    )
    train = [r for r in rows if "tokens_per_s" in r]
    train_rows = [[r["config"], r["generator"], fmt(r["tokens_per_s"], 0)] for r in train]
    table += "\n" + markdown_table(["config", "training step", "tokens/s"], train_rows)
    return table


def paper_tables(rows: list[dict], batch: int) -> str:
    """The paper's Tables 1 (MNIST) and 4 (CIFAR-10), speed columns: images/s and the speedup over
    softmax, theirs (one GPU) next to ours (this CPU, at the fixed batch and at batch 1)."""
    names = {
        "softmax-recompute": "softmax",
        "softmax-cache": "stateful softmax",
        "lsh-1": "lsh-1",
        "lsh-4": "lsh-4",
        "linear-rnn": "linear",
        "linear-rnn-bf16": "linear (bf16 weights)",
        "linear-rnn-bf16dot": "linear (bf16 dots)",
    }
    gen = [r for r in rows if "seconds_per_image" in r]
    out = ""
    for config in dict.fromkeys(r["config"] for r in gen):
        by = {(r["generator"], r["fixed_batch"]): r for r in gen if r["config"] == config}
        # (at CIFAR-10 length the recomputing baseline is timed at batch 1 only)
        base_1 = by[("softmax-recompute", False)]
        base_b = by.get(("softmax-recompute", True), base_1)
        body = []
        for g, name in names.items():
            if (g, False) not in by:
                continue
            rb, r1 = by.get((g, True), by[(g, False)]), by[(g, False)]
            paper = PAPER.get((config, g))
            paper_base = PAPER[(config, "softmax-recompute")]
            body.append(
                [
                    name,
                    fmt(paper, 3) if paper else "-",
                    fmt(paper / paper_base, 1) + "x" if paper else "-",
                    fmt(rb["images_per_s"], 3) + ("" if rb["batch"] == batch else f" (batch {rb['batch']})"),
                    fmt(rb["images_per_s"] / base_b["images_per_s"], 1) + "x",
                    fmt(r1["seconds_per_image"], 2),
                    fmt(base_1["seconds_per_image"] / r1["seconds_per_image"], 1) + "x",
                ]
            )
        table = "Table 1" if config == "mnist" else "Table 2"
        out += (
            f"{config} ({table} of the paper)\n\n"
            + markdown_table(
                [
                    "method",
                    "paper images/s",
                    "paper speedup",
                    f"ours images/s, batch {batch}",
                    "ours speedup",
                    "ours s/image, batch 1",
                    "ours speedup, batch 1",
                ],
                body,
            )
            + "\n"
        )
    out += (
        "Softmax and LSH rows are timed at a few positions and integrated over the image (see the 'how'\n"
        "column of generate.csv). The paper's Tables 4 (stateful softmax) and 5 (batch-1 CPU latency) are\n"
        "not quoted here.\n"
    )
    return out


def plot(curves, path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(k[0] for k in curves))
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4), squeeze=False)
    colors = {
        "linear-rnn": "tab:blue",
        "linear-rnn-bf16": "tab:cyan",
        "linear-rnn-bf16dot": "tab:purple",
        "softmax-cache": "tab:orange",
        "softmax-recompute": "tab:red",
        "lsh-1": "tab:green",
        "lsh-4": "tab:olive",
    }
    for ax, config in zip(axes[0], configs, strict=True):
        for (c, label, b), (pos, times) in curves.items():
            if c == config:
                ax.plot(
                    np.array(pos) + 1,
                    np.array(times) * 1e3,
                    "o-" if b == 1 else "s--",
                    color=colors[label],
                    label=f"{label}, batch {b}",
                )
        ax.set_yscale("log")
        ax.set_xlabel("position of the generated token")
        ax.set_ylabel("ms per generated token (whole batch)")
        ax.set_title(f"{config}: cost of one generation step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
