"""int8 dots on AMX tiles: the GEMV entry point (lt_llama_gemv_f32, tiles, one thread) of the commit
before the epilogue change (HEAD when run) against the working tree, both built and loaded in one
process, taking turns 9 times per shape; outputs compared bit for bit. Behind BENCHMARKS.md's
"Batched rows on AMX tiles". Run from the repository root before committing the change:
    PYTHONPATH=src python evidence/bench/linearized-tiles-2026-12-08-xeon/int8-epilogue/ab_i8.py > ab_i8.txt
"""

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from linear_transformers import native
from linear_transformers.decode import llama
from linear_transformers.results import machine_info

libs = {}
root = Path(llama.__file__).parents[2]
for rev in ("HEAD", "work"):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for src in [*llama.SOURCES, native.SIMD_H]:
            rel = src.relative_to(root)
            text = (
                src.read_bytes()
                if rev == "work"
                else subprocess.run(["git", "show", f"{rev}:src/{rel}"], capture_output=True, check=True).stdout
            )
            (folder / src.name).write_bytes(text)
        native.register(
            f"llama_step_i8_{rev}",
            [folder / s.name for s in [*llama.SOURCES, native.SIMD_H]],
            "any",
            llama._set_signatures,
        )
        libs[rev] = native.load(f"llama_step_i8_{rev}").lib
print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
g = torch.Generator().manual_seed(0)
for name, n_out, n_in in [("q/o", 576, 576), ("gate/up", 1536, 576), ("down", 576, 1536), ("head", 49152, 576)]:
    w = torch.randn(n_out, n_in, generator=g)
    packed = llama.convert(w, torch.int8)
    for B in (16, 64):
        x = torch.randn(B, n_in, generator=g)
        out = {r: torch.empty(B, n_out) for r in libs}
        times = {r: [] for r in libs}
        for _ in range(9):
            for r, lib in libs.items():
                t0 = time.perf_counter()
                assert (
                    lib.lt_llama_gemv_f32(
                        4, 1, B, n_in, n_out, packed.data_ptr(), None, x.data_ptr(), out[r].data_ptr()
                    )
                    == 0
                )
                times[r].append(time.perf_counter() - t0)
        med = {r: statistics.median(t) for r, t in times.items()}
        fl = 2 * B * n_in * n_out
        print(
            name,
            B,
            "equal"
            if torch.equal(out["HEAD"], out["work"])
            else f"DIFF {(out['HEAD'] - out['work']).abs().max().item():.2e}",
            " ".join(f"{r} {1e3 * m:.3f} ms {fl / m / 1e9:.0f} GF/s" for r, m in med.items()),
            f"speed-up {med['HEAD'] / med['work']:.2f}x",
        )
