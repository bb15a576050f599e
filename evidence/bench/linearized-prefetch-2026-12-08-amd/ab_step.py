"""One-off side-by-side check behind BENCHMARKS.md's prefetching in the attention phase: the bare
fused C step of runs/lz-hybrid/model (batch 1, after a 256-token prefill) built from the sources of
each commit given, in each format, taking turns for 50 rounds of 5 steps; medians and mins of ms per
step, and each commit's median against the first's. Run from the repository root:
    PYTHONPATH=src python evidence/bench/linearized-prefetch-2026-12-08-amd/ab_step.py 376121c 4de41ed > ab_step.txt
    PYTHONPATH=src python evidence/bench/linearized-prefetch-2026-12-08-amd/ab_step.py 4de41ed a6c1399 > ab_step_wo.txt
"""

import copy
import statistics
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

revs, formats = sys.argv[1:], ["int8", "bf16", "float32"]
libs = {}
for rev in revs:
    with tempfile.TemporaryDirectory() as tmp:  # (the sources, until the library is built and loaded)
        folder = Path(tmp)
        for src in llama.SOURCES + [native.SIMD_H]:
            rel = src.relative_to(Path(llama.__file__).parents[2])
            text = subprocess.run(["git", "show", f"{rev}:src/{rel}"], capture_output=True, check=True).stdout
            (folder / src.name).write_bytes(text)
        sources = [folder / s.name for s in llama.SOURCES + [native.SIMD_H]]
        native.register(f"llama_step_ab_{rev}", sources, "any", llama._set_signatures)
        libs[rev] = native.load(f"llama_step_ab_{rev}").lib
    assert libs[rev] is not None, rev
model = AutoModelForCausalLM.from_pretrained("runs/lz-hybrid/model").eval()
ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
cache = LinearizedCache()
with torch.no_grad():
    model(ids, cache=cache, use_cache=True)
steps = {(rev, f): fused_step(model, DecodeConfig.precision(f)) for f in formats for rev in revs}
states = {k: [copy.deepcopy(cache.states[i]) for i in range(len(cache.states))] for k in steps}
token, times, first = torch.tensor([5]), {k: [] for k in steps}, {}
original = llama.load
try:
    for r in range(50):
        for (rev, f), step in steps.items():
            llama.load = lambda lib=libs[rev]: lib
            t0 = time.perf_counter()
            for _ in range(5):
                out = step(token, states[rev, f][0].seen.clone(), states[rev, f])
            times[rev, f].append((time.perf_counter() - t0) / 5)
            first.setdefault((rev, f), out.clone())
finally:
    llama.load = original
print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {' '.join(sys.argv)}")
print("format,commit,median_ms,min_ms,first_median_over_this,max_logit_difference_from_first")
for f in formats:
    base = statistics.median(times[revs[0], f])
    for rev in revs:
        t = times[rev, f]
        diff = (first[rev, f] - first[revs[0], f]).abs().max().item()
        print(f"{f},{rev},{statistics.median(t) * 1e3:.3f},{min(t) * 1e3:.3f},{base / statistics.median(t):.3f},{diff:.2e}")
