"""The attention kernel next to PyTorch's own work: does what ran just before a call change its time?

    linear-transformers bench threads              # N=8192, both ways of threading the kernel

PyTorch's OpenMP workers keep spinning for a while after each parallel region (libgomp's default
wait policy), so a kernel that brings threads of its own shares the cores with them when it runs
right after a matmul, as it does inside every model. The kernel is therefore built to run on
PyTorch's own OpenMP pool where the compiler has PyTorch's runtime (native/build.py). This program
measures both builds of the same source, "openmp" (PyTorch's pool) and "pthreads" (threads of its
own), at B=1, H=8, D=64 and --length: each build is first checked against "chunked", then, over
--repeats rounds, one call of the kernel is timed right after each of: another kernel call, a
512 x 512 matmul, a "chunked" call, a 50 ms pause; and one "chunked" call right after "chunked" and
right after the kernel. Forward, and forward+backward. Writes threads.csv (every timed call),
table.md (median and best per case) and threads.png under --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, write_csv
from .measure import rel_error

BEFORE = ("kernel", "matmul", "chunked", "pause")


@dataclass
class ThreadsOptions:
    length: int = count(8192, "sequence length N")
    repeats: int = count(15, "rounds; each round times every case once")
    threads: int = option(torch.get_num_threads(), "CPU threads")
    quick: bool = option(False, "N=512, 2 rounds (seconds: a smoke test)")
    out: Path = option(Path("results/bench-threads"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ThreadsOptions, title="benchmark")


def _calls(N: int):
    """The kernel and "chunked" as zero-argument calls, forward and forward+backward, on one input."""
    from ..ops import chunked, cpu

    B, H, D = 1, 8, 64
    g = torch.Generator().manual_seed(N)
    q, k = (torch.rand(B, N, H, D, generator=g) + 0.1 for _ in range(2))
    v, dy = (torch.randn(B, N, H, D, generator=g) for _ in range(2))
    S0, z0 = torch.zeros(B, H, D, D), torch.zeros(B, H, D)

    def make(mod, backward: bool):
        def run():
            fwd = mod.run_forward(q, k, v, S0, z0, 1e-6, 64, backward)
            if backward:
                mod.run_backward(q, k, v, fwd.y, fwd.out_acc, fwd.saved, dy, S0, z0, 1e-6, 64)
            return fwd.y

        return run

    return {(name, bwd): make(mod, bwd) for name, mod in (("kernel", cpu), ("chunked", chunked)) for bwd in (0, 1)}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(build_name: str, N: int, repeats: int) -> list[dict]:
    calls = _calls(N)
    err = rel_error(calls[("kernel", 0)](), calls[("chunked", 0)]())
    if not err < 1e-4:
        raise SystemExit(f"verification failed: the {build_name} kernel differs from 'chunked' (rel. error {err:.2e})")
    print(f"  {build_name}: verified against 'chunked' (rel. error {err:.1e})", flush=True)
    a = torch.randn(512, 512)
    before = {"kernel": None, "matmul": lambda: a @ a, "chunked": None, "pause": lambda: time.sleep(0.05)}
    rows = []
    for fn in calls.values():  # warm: first-call allocations, the build's verdict
        fn()
    for r in range(repeats):
        for bwd in (0, 1):
            phase = "fwd+bwd" if bwd else "fwd"
            cases = [("kernel", b) for b in BEFORE] + [("chunked", "chunked"), ("chunked", "kernel")]
            for timed, after in cases:
                prev = before[after] or calls[(after, bwd)]
                prev()
                rows.append(
                    {
                        "build": build_name,
                        "phase": phase,
                        "timed": timed,
                        "after": after,
                        "round": r,
                        "ms": _time(calls[(timed, bwd)]),
                    }
                )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["build"], r["phase"], r["timed"], r["after"]), []).append(r["ms"])
    return [
        {"build": b, "phase": p, "timed": t, "after": a, "median_ms": statistics.median(xs), "best_ms": min(xs)}
        for (b, p, t, a), xs in groups.items()
    ]


def plot(summary: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        rows = [r for r in summary if r["phase"] == phase]
        labels = [f"{r['timed']}\nafter {r['after']}" for r in rows if r["build"] == rows[0]["build"]]
        builds = list(dict.fromkeys(r["build"] for r in rows))
        width = 0.8 / len(builds)
        for i, b in enumerate(builds):
            ys = [r["median_ms"] for r in rows if r["build"] == b]
            ax.bar([x + i * width for x in range(len(ys))], ys, width, label=b)
        ax.set_xticks([x + width * (len(builds) - 1) / 2 for x in range(len(labels))], labels, fontsize=7)
        ax.set_ylabel("median ms")
        ax.set_title(phase)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(args: argparse.Namespace) -> int:
    from .. import native
    from ..ops import cpu

    for name in ("length", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    N, repeats = (512, 2) if args.quick else (args.length, args.repeats)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads, N={N}")
    for line in isa_lines():
        print(line)
    rows, builds = [], []
    for name, openmp in (("openmp", True), ("pthreads", False)):
        with native.use(openmp=openmp):
            if not cpu.available():
                print(f"  {name}: skipped, the kernel is unavailable ({cpu.unavailable_reason()})")
                continue
            b = native.build_info(cpu.LIBRARY)
            if b.openmp != openmp:
                print(f"  {name}: skipped, this compiler does not build it ({b.describe()})")
                continue
            builds.append(f"{name}: {b.describe()}")
            rows += measure(name, N, repeats)
    if not rows:
        raise SystemExit("no build of the kernel to measure")
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "threads.csv", rows)
    table = markdown_table(
        ["build", "phase", "timed", "right after", "median ms", "best ms"],
        [
            [r["build"], r["phase"], r["timed"], r["after"], fmt(r["median_ms"], 1), fmt(r["best_ms"], 1)]
            for r in summary
        ],
    )
    header = (
        f"The attention kernel after other work, B=1 H=8 D=64 N={N} float32, {args.threads} threads, "
        f"{repeats} rounds; {info['cpu']}, torch {info['torch']}\n"
        + "".join(line + "\n" for line in isa_lines())
        + "".join(f"Build {b}\n" for b in builds)
    )
    (args.out / "table.md").write_text(header + "\n" + table + "\n")
    print(table)
    plotted = plot(summary, args.out / "threads.png", f"attention kernel after other work, N={N}, {info['cpu']}")
    print(f"wrote {args.out}/threads.csv, table.md" + (", threads.png" if plotted else ""))
    return 0
