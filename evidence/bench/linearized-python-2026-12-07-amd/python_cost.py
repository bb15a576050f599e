"""One-off measurement behind BENCHMARKS.md's "Python around the fused step": what the per-token
checks of the fused Llama step cost when read cold, as they are in decoding (the step has just
streamed the weights through the caches: a 64 MB pass over memory stands in for it before each
call), and warm. runs/lz-hybrid/model, int8, batch 1, after a 64-token prefill and one step; medians
of 200 calls. The weights' check (FusedLlamaStep.current: every parameter's address and version) is
what the forward ran before each token and what generate() now runs once per call; the states'
check is b09b1bf's key (each state tensor's address and layout, written out here as it was) against
`knows` (the same tensors, by identity). Run from the repository root:
    PYTHONPATH=src python evidence/bench/linearized-python-2026-12-07-amd/python_cost.py > python_cost.txt
"""

import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from linear_transformers.decode import DecodeConfig
from linear_transformers.linearize import LinearizedCache
from linear_transformers.linearize.step import fused_step
from linear_transformers.results import machine_info

model = AutoModelForCausalLM.from_pretrained("runs/lz-hybrid/model").eval()
model.decode_config = DecodeConfig.precision("int8")
ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
cache = LinearizedCache()
with torch.no_grad():
    model(ids, cache=cache, use_cache=True)
    model(torch.tensor([[5]]), cache=cache, use_cache=True)  # (one fused step: the states are known)
step = fused_step(model, model.decode_config)
states = [cache.states[i] for i in range(model.config.num_hidden_layers)]
used = step._used
big = torch.ones(64 << 18)  # 64 MB


def old_key():  # b09b1bf's _state_arrays key
    return (1, [(t.data_ptr(), t.is_contiguous()) for s in states for t in (getattr(s, n) for n in used)])


checks = {
    "weights: step.current() (~400 parameters)": step.current,
    "states: b09b1bf's key (180 tensors' address and layout)": old_key,
    "states: knows() (the same tensors, by identity)": lambda: step.knows(1, states),
}
assert step.current() and step.knows(1, states)
print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
print("check,cold_us,warm_us")
for name, f in checks.items():
    cold, warm = [], []
    for _ in range(200):
        big.sum()
        t0 = time.perf_counter()
        f()
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        f()
        warm.append(time.perf_counter() - t0)
    print(f"{name},{statistics.median(cold) * 1e6:.1f},{statistics.median(warm) * 1e6:.1f}")
