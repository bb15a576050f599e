"""bench attention --isa: the benchmark once per ISA level of the C kernels (bench/levels.py), each in its own
process, then the levels side by side (levels.csv, levels.md, levels.png)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..results import fmt, markdown_table, write_csv
from . import levels


def per_level(args: argparse.Namespace) -> int:
    """The benchmark once per ISA level (bench/levels.py), then the levels side by side."""
    import csv

    argv = [
        "--lengths",
        *map(str, args.lengths),
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--dim",
        str(args.dim),
        "--chunk-size",
        str(args.chunk_size),
        "--dtype",
        args.dtype,
        "--impls",
        *args.impls,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    folders = levels.run_each("attention", argv, levels.resolve(args.isa), args.out)
    rows, auto = [], {}
    for level, folder in folders.items():
        with open(folder / "attention.csv") as f:
            rows += [{**r, "level": level} for r in csv.DictReader(f)]
        if (folder / "auto.csv").exists():
            with open(folder / "auto.csv") as f:
                auto.update({(level, int(r["N"])): float(r["auto_vs_best"]) for r in csv.DictReader(f)})
    table, out_rows = levels_table(rows, auto)
    write_csv(args.out / "levels.csv", out_rows)
    heads = [(folder / "table.md").read_text().split("\n\n")[1].strip() for folder in folders.values()]
    text = f"Causal attention per ISA level, B={args.batch} H={args.heads} D={args.dim} {args.dtype}\n\n"
    text += "\n\n".join(f"{level}: {head}" for level, head in zip(folders, heads, strict=True))
    (args.out / "levels.md").write_text(text + "\n\n" + table)
    print()
    print(table)
    plot_levels(
        out_rows,
        args.out / "levels.png",
        f"causal attention per ISA level, B={args.batch} H={args.heads} D={args.dim} {args.dtype}",
    )
    print(f"wrote {args.out / 'levels.csv'}, {args.out / 'levels.md'}, {args.out / 'levels.png'}")
    return 0


def levels_table(rows: list[dict], auto: dict | None = None) -> tuple[str, list[dict]]:
    """Per (level, N): the kernel's fwd and fwd+bwd, its ratio to "chunked" and SDPA, and "auto"
    against the faster of "cpu" and "chunked" (all from one process per level; `auto`, (level, N)
    -> the paired rounds' ratio (auto_interleaved), where the run measured it, replaces the ratio
    of the separate timings)."""
    auto = auto or {}
    by = {(r["level"], int(r["N"]), r["impl"]): r for r in rows if r.get("fwd_ms")}
    out = []
    for level in dict.fromkeys(r["level"] for r in rows):
        for N in sorted({int(r["N"]) for r in rows}):
            get = {impl: by.get((level, N, impl)) for impl in ("chunked", "cpu", "auto", "softmax")}
            if not get["cpu"] or not get["chunked"]:
                continue
            ms = {impl: (float(r["fwd_ms"]), float(r["fwdbwd_ms"])) for impl, r in get.items() if r}
            row = {
                "level": level,
                "N": N,
                "cpu_fwd_ms": ms["cpu"][0],
                "cpu_fwdbwd_ms": ms["cpu"][1],
                "chunked_fwd_ms": ms["chunked"][0],
                "chunked_fwdbwd_ms": ms["chunked"][1],
                "cpu_vs_chunked_fwd": ms["chunked"][0] / ms["cpu"][0],
                "cpu_vs_chunked_fwdbwd": ms["chunked"][1] / ms["cpu"][1],
            }
            if "softmax" in ms:
                row["cpu_vs_softmax_fwdbwd"] = ms["softmax"][1] / ms["cpu"][1]
            if (level, N) in auto:
                row["auto_vs_best_fwdbwd"] = auto[(level, N)]
            elif "auto" in ms:
                row["auto_vs_best_fwdbwd"] = ms["auto"][1] / min(ms["cpu"][1], ms["chunked"][1])
            out.append(row)
    header = [
        "level",
        "N",
        "cpu fwd ms",
        "cpu fwd+bwd ms",
        "chunked fwd ms",
        "chunked fwd+bwd ms",
        "cpu/chunked fwd",
        "cpu/chunked fwd+bwd",
        "cpu/SDPA fwd+bwd",
        "auto / best (paired rounds where measured)",
    ]
    cells = [
        [
            r["level"],
            str(r["N"]),
            fmt(r["cpu_fwd_ms"]),
            fmt(r["cpu_fwdbwd_ms"]),
            fmt(r["chunked_fwd_ms"]),
            fmt(r["chunked_fwdbwd_ms"]),
            fmt(r["cpu_vs_chunked_fwd"], 2) + "x",
            fmt(r["cpu_vs_chunked_fwdbwd"], 2) + "x",
            fmt(r.get("cpu_vs_softmax_fwdbwd")) + "x" if "cpu_vs_softmax_fwdbwd" in r else "-",
            fmt(r.get("auto_vs_best_fwdbwd"), 2) if "auto_vs_best_fwdbwd" in r else "-",
        ]
        for r in out
    ]
    return markdown_table(header, cells), out


def plot_levels(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, level in enumerate(dict.fromkeys(r["level"] for r in rows)):
        pts = [r for r in rows if r["level"] == level]
        Ns, color = [r["N"] for r in pts], f"C{i}"
        ax.plot(Ns, [r["cpu_vs_chunked_fwdbwd"] for r in pts], "o-", color=color, label=f"{level}: fwd+bwd")
        ax.plot(Ns, [r["cpu_vs_chunked_fwd"] for r in pts], "s--", color=color, alpha=0.6, label=f"{level}: fwd")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel('speed-up of the C kernel over "chunked"')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
