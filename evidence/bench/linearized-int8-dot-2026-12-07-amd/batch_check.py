"""One-off side-by-side check behind BENCHMARKS.md's batch numbers for int8 dot products: the bare
fused C step (no transformers forward, no sampler) of runs/lz-hybrid/model after a 256-token
prefill, B rows at once, the formats taking turns for 40 rounds; median and min ms per step.
Run: PYTHONPATH=src python evidence/bench/linearized-int8-dot-2026-12-07-amd/batch_check.py > .../batch_check.txt"""

import copy
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from linear_transformers.decode import DecodeConfig
from linear_transformers.linearize import LinearizedCache
from linear_transformers.linearize.step import fused_step
from linear_transformers.results import machine_info

model = AutoModelForCausalLM.from_pretrained("runs/lz-hybrid/model").eval()
formats = ["float32", "bf16", "int8", "int8-dot"]
steps = {f: fused_step(model, DecodeConfig.precision(f)) for f in formats}
print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {' '.join(sys.argv)}")
print("rows,format,median_ms,min_ms")
for B in (1, 8, 16):
    ids = torch.randint(0, model.config.vocab_size, (B, 256), generator=torch.Generator().manual_seed(B))
    cache = LinearizedCache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    states = {f: [copy.deepcopy(cache.states[i]) for i in range(len(cache.states))] for f in formats}
    token, times = torch.full((B,), 5), {f: [] for f in formats}
    for _ in range(40):
        for f in formats:
            t0 = time.perf_counter()
            steps[f](token, states[f][0].seen.clone(), states[f])
            times[f].append(time.perf_counter() - t0)
    for f in formats:
        print(f"{B},{f},{statistics.median(times[f]) * 1e3:.2f},{min(times[f]) * 1e3:.2f}")
