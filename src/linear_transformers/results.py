"""What every result folder shares, benchmarks and experiments alike: where and with what it ran
(machine_info, isa_info, provenance: the command line, the git commit, the host's flags and
versions), and how its numbers are written (CSV rows, Markdown tables, log-log plots)."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def isa_info() -> dict[str, str]:
    """What decides CPU speed besides the chip: its vector flags, the ISA level PyTorch's kernels
    run at, and how the project's C kernels were built (level, flags, compiler)."""
    from . import native
    from .decode import fused
    from .native import build
    from .ops import cpu

    flags = build.cpu_flags() or frozenset()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd")
    wanted += ("sve",)
    b, step = native.build_info(cpu.LIBRARY), native.build_info(fused.LIBRARY)
    return {
        "cpu_flags": " ".join(f for f in wanted if f in flags) or "(none of " + ", ".join(wanted) + ")",
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        "kernel": b.describe() if b else f"unavailable: {cpu.unavailable_reason()}",
        "step_openmp": "unavailable" if step is None else "with OpenMP" if step.openmp else "without OpenMP",
    }


def isa_lines() -> list[str]:
    i = isa_info()
    return [
        f"CPU flags: {i['cpu_flags']}; PyTorch kernels: {i['torch_isa']}",
        f"C kernels: {i['kernel']} (the fused step {i['step_openmp']})",
    ]


def provenance(command_line: str | None = None) -> dict:
    """What made a result, for its folder: the command line, the git commit of this checkout, the
    host's CPU and its vector flags, cores, versions, the date (UTC). Take it when the run starts (the
    checkout may move on while it runs) and add `finished(...)` when it ends."""
    commit = ""
    with contextlib.suppress(OSError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    host = machine_info()["cpu"]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.partition(":")[2].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")
                host += " (" + " ".join(f for f in wanted if f in have) + ")"
                break
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    if "transformers" in sys.modules:  # (only where a result used it)
        versions["transformers"] = sys.modules["transformers"].__version__
    made = {"command": command_line} if command_line else {}
    return {
        **made,
        "git_commit": commit,
        "host": host,
        "cores": os.cpu_count(),
        **versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def finished(started: dict) -> dict:
    """A provenance taken at the start, with the time the run ended."""
    return {**started, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_run_record(out: Path, started: dict, **extra) -> Path:
    """out/run.json: what made the folder's results (`started`: a provenance taken when the command
    began: its command line, git commit, host flags, versions, date), when it finished, and `extra`
    (an experiment's model configurations...), written by the program."""
    import json

    path = out / "run.json"
    path.write_text(json.dumps({**finished(started), **extra}, indent=2, default=str) + "\n")
    return path


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def finish_log_log(fig, axes_labels, title: str, path: Path) -> None:
    """Log-log axes against the sequence length (each axis with its y label), then save the figure."""
    import matplotlib.pyplot as plt

    for ax, ylabel in axes_labels:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
