"""Running a benchmark once per ISA level (`--isa LEVEL ...` or `--isa all`), each level in its own
process: the compiled kernels are built for that level (LINEAR_TRANSFORMERS_ISA), and PyTorch is
capped to the same instruction set (ATEN_CPU_CAPABILITY and MKL's and oneDNN's limits, which must be
set before torch is imported), so the "chunked" and SDPA columns are what a machine of that level
would run. Each level writes its usual outputs under OUT/<level>; the benchmark then puts the
levels side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..native import build
from ..options import add_options, option

# PyTorch limited to a level's instruction set, so an AVX2 column compares like with like (what the cap
# changes: BENCHMARKS.md, "The CPU kernels per ISA level")
PYTORCH_CAPS = {
    "x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "x86-64": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


@dataclass
class IsaOption:
    isa: list[str] | None = option(
        None,
        f"run once per ISA level ({', '.join(build.LEVELS)}, or 'all' for every level this CPU runs but 'generic'), "
        "each in its own process with PyTorch capped to the same level; outputs under OUT/<level>",
        metavar="LEVEL",
    )


def add_isa_argument(p) -> None:
    add_options(p, IsaOption, title="ISA levels")


def resolve(levels: list[str]) -> list[str]:
    """The levels asked for, checked against this CPU ("all": every one it runs but "generic")."""
    if levels == ["all"]:
        return [level for level in build.supported_levels() if level != "generic"]
    for level in levels:
        build.check_level(level)
    return levels


def run_each(benchmark: str, argv: list[str], levels: list[str], out: Path) -> dict[str, Path]:
    """Runs `python -m linear_transformers.bench BENCHMARK ARGV --out OUT/<level>` per level; returns
    the output folders. Raises if a level's run fails."""
    folders = {}
    for level in levels:
        env = {**os.environ, "LINEAR_TRANSFORMERS_ISA": level, **PYTORCH_CAPS.get(level, {})}
        folder = out / level
        cmd = [sys.executable, "-m", "linear_transformers.bench", benchmark, *argv, "--out", str(folder)]
        caps = " ".join(f"{k}={v}" for k, v in PYTORCH_CAPS.get(level, {}).items())
        print(f"\n=== ISA level {level}{' (PyTorch capped: ' + caps + ')' if caps else ''} ===", flush=True)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode:
            raise SystemExit(f"the {benchmark} benchmark at level {level} failed (exit {proc.returncode})")
        folders[level] = folder
    return folders
