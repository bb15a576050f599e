"""One-off side-by-side check behind BENCHMARKS.md's numbers for the Hedgehog maps in the weights'
format: the bare fused C step of runs/lz-hybrid/model, batch 1, after a 256-token prefill, built from
this commit's sources ("maps in the format") and from the sources of commit 84ee743 ("float32 maps",
its library registered under another name in the same process), taking turns for 60 rounds of 5
steps each; medians and mins of ms per step. The old step gets float32 maps, the new one its format's.
With --bound a third step, "no map traffic": 84ee743 patched by probe-no-map-traffic.diff (every map
reads layer 0's first head, so that no map weight comes from memory), the most the maps' format could
give. Run from the repository root:
PYTHONPATH=src python evidence/bench/linearized-maps-2026-12-07-amd/ab_maps.py [--bound] [formats...]
(The outputs were made at commit 8b70f86, where the maps had their own convert_map; the script now
patches llama.convert, which took it over.)"""

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
from linear_transformers.linearize.step import fused_step, llama_weights
from linear_transformers.results import machine_info

OLD = "84ee743"
old_dir = Path(tempfile.mkdtemp())
for src in llama.SOURCES + [native.SIMD_H]:
    rel = src.relative_to(Path(llama.__file__).parents[2])
    text = subprocess.run(["git", "show", f"{OLD}:src/{rel}"], capture_output=True, check=True).stdout
    (old_dir / src.name).write_bytes(text)
old_files = [old_dir / s.name for s in llama.SOURCES + [native.SIMD_H]]
native.register("llama_step_84ee743", old_files, "any", llama._set_signatures)
old_lib, new_lib = native.load("llama_step_84ee743").lib, llama.load()
assert old_lib is not None and new_lib is not None
bound = "--bound" in sys.argv
if bound:
    probe_dir = Path(tempfile.mkdtemp())
    for f in old_files:
        (probe_dir / f.name).write_bytes(f.read_bytes())
    diff = Path(__file__).with_name("probe-no-map-traffic.diff").read_text()
    subprocess.run(["patch", "-p4", "-d", str(probe_dir)], input=diff, text=True, check=True, capture_output=True)
    native.register("llama_step_probe", [probe_dir / f.name for f in old_files], "any", llama._set_signatures)
    probe_lib = native.load("llama_step_probe").lib

model = AutoModelForCausalLM.from_pretrained("runs/lz-hybrid/model").eval()
ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
cache = LinearizedCache()
with torch.no_grad():
    model(ids, cache=cache, use_cache=True)
formats = [a for a in sys.argv[1:] if a != "--bound"] or ["float32", "bf16", "int8", "int8-dot"]
steps = {}
for f in formats:
    steps["maps in the format", f] = (new_lib, fused_step(model, DecodeConfig.precision(f)))
    keep = llama.convert
    llama.convert = lambda w, weights: w.detach() if w.dim() == 3 else keep(w, weights)  # (84ee743: float32 maps)
    try:
        cfg = DecodeConfig.precision(f)
        steps["float32 maps", f] = (old_lib, llama.FusedLlamaStep(llama_weights(model), cfg.weights, cfg.dot))
        if bound:
            steps["no map traffic", f] = (probe_lib, llama.FusedLlamaStep(llama_weights(model), cfg.weights, cfg.dot))
    finally:
        llama.convert = keep
states = {k: [copy.deepcopy(cache.states[i]) for i in range(len(cache.states))] for k in steps}
token, times = torch.tensor([5]), {k: [] for k in steps}
original_load = llama.load
try:
    for _ in range(60):
        for key, (lib, step) in steps.items():
            llama.load = lambda lib=lib: lib
            t0 = time.perf_counter()
            for _ in range(5):
                step(token, states[key][0].seen.clone(), states[key])
            times[key].append((time.perf_counter() - t0) / 5)
finally:
    llama.load = original_load
print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {' '.join(sys.argv)}")
print("format,maps,median_ms,min_ms")
for (kind, f), t in times.items():
    print(f"{f},{kind},{statistics.median(t) * 1e3:.3f},{min(t) * 1e3:.3f}")
