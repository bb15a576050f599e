"""One-off measurement behind BENCHMARKS.md's attention halves: the bare fused C step (int8, batch 1,
runs/lz-hybrid/model after a 256-token prefill) built from the sources of each commit given, with a
timer (omp_get_wtime) added before and after each of a layer's five barriers, so that each thread's
work and wait per phase are summed (ms per token). The commits take turns, 8 rounds of 25 steps.
Run from the repository root:
    PYTHONPATH=src python evidence/bench/linearized-python-2026-12-07-amd/phases.py 11de7d6 376121c > phases.txt
--precision P times another --cpu-precision (int8 by default); --head adds the LM head (phase F: its
norm and projection, in the "wait" columns, from the last barrier to the end of the step) and the
whole call as Python times it (evidence/bench/linearized-2026-12-08-xeon/phases_head.txt:
--precision int8-dot --head HEAD).
"""

import argparse
import copy
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from linear_transformers import native
from linear_transformers.decode import DecodeConfig, llama
from linear_transformers.linearize import LinearizedCache
from linear_transformers.linearize.step import fused_step
from linear_transformers.results import machine_info

PHASES = ["A: q, k, v", "B: attention", "C: output projection, rings", "D: gate, up", "E: down"]
p = argparse.ArgumentParser()
p.add_argument("--precision", default="int8")
p.add_argument("--head", action="store_true")
p.add_argument("revs", nargs="+")
args = p.parse_args()
if args.head:
    PHASES.append("F: head")


def timed_sources(rev: str, folder: Path) -> list[Path]:
    for src in [*llama.SOURCES, native.SIMD_H]:
        rel = src.relative_to(Path(llama.__file__).parents[2])
        text = subprocess.run(["git", "show", f"{rev}:src/{rel}"], capture_output=True, check=True, text=True).stdout
        if src.name == "llama_step.c":
            text = text.replace(
                "#include <string.h>\n",
                "#include <string.h>\n#include <omp.h>\ndouble lt_phase[2][16];\n"
                "#define TICK(i) do { double n_ = omp_get_wtime(); "
                "lt_phase[omp_get_thread_num() & 1][i] += n_ - t_; t_ = n_; } while (0)\n",
                1,
            )
            start, end = text.index("static void llama_blocks"), text.index("int lt_llama_token_f32")
            body = text[start:end].replace(
                "    for (int l = 0; l < m->n_layers; l++) {",
                "    double t_ = omp_get_wtime();\n    for (int l = 0; l < m->n_layers; l++) {",
                1,
            )
            if args.head:
                at = "    rms_norm(B, d, x, m->final_norm"
                assert body.count(at) == 1, rev
                body = body.replace(at, "    TICK(10);\n" + at).rstrip()[:-1] + "    TICK(11);\n}\n\n"
            parts = body.split("#pragma omp barrier")
            assert len(parts) == 6, rev
            body = parts[0]
            for i, p in enumerate(parts[1:]):
                body = body.rstrip() + f"\n        TICK({2 * i});\n#pragma omp barrier\n        TICK({2 * i + 1});" + p
            text = text[:start] + body + text[end:]
        (folder / src.name).write_text(text)
    return [folder / s.name for s in [*llama.SOURCES, native.SIMD_H]]


revs = args.revs
model = AutoModelForCausalLM.from_pretrained("runs/lz-hybrid/model").eval()
ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
cache = LinearizedCache()
with torch.no_grad():
    model(ids, cache=cache, use_cache=True)
runs = {}
for rev in revs:
    with tempfile.TemporaryDirectory() as tmp:  # (the sources, until the library is built and loaded)
        native.register(f"llama_step_{rev}", timed_sources(rev, Path(tmp)), "any", llama._set_signatures)
        lib = native.load(f"llama_step_{rev}").lib
    assert lib is not None
    runs[rev] = (
        lib,
        fused_step(model, DecodeConfig.precision(args.precision)),
        [copy.deepcopy(cache.states[i]) for i in range(len(cache.states))],
    )
token, steps, wall = torch.tensor([5]), 0, {}
original = llama.load
try:
    for r in range(9):
        for rev, (lib, step, states) in runs.items():
            if r == 1:  # (the first round warms up)
                timers = (ctypes.c_double * 32).in_dll(lib, "lt_phase")
                for i in range(32):
                    timers[i] = 0
                wall[rev] = 0.0
            llama.load = lambda lib=lib: lib
            t0 = time.perf_counter()
            for _ in range(25):
                step(token, states[0].seen.clone(), states)
            wall[rev] = wall.get(rev, 0.0) + time.perf_counter() - t0
finally:
    llama.load = original
steps = 8 * 25
print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {' '.join(sys.argv)}")
print("commit,phase,thread 0 work ms,thread 0 wait ms,thread 1 work ms,thread 1 wait ms")
for rev, (lib, _, _) in runs.items():
    t = (ctypes.c_double * 32).in_dll(lib, "lt_phase")
    for i, name in enumerate(PHASES):
        w0, s0, w1, s1 = (t[k] / steps * 1e3 for k in (2 * i, 2 * i + 1, 16 + 2 * i, 16 + 2 * i + 1))
        print(f"{rev},{name},{w0:.3f},{s0:.3f},{w1:.3f},{s1:.3f}")
    if args.head:
        print(f"{rev},whole call from Python,{wall[rev] / steps * 1e3:.3f},,,")
