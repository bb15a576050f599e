"""One-off side-by-side check behind BENCHMARKS.md's "Python around the fused step": transformers'
generate() on runs/lz-hybrid/model (batch 1, greedy, a 512-token prompt, 32 new tokens), per-token
time as the interval between consecutive calls of a logits processor (the model's forward plus
generate()'s own loop), in each weight format; the code of commit b09b1bf (the weights and the
states checked at every token) against this commit's, as separate processes taking turns, 6 rounds
each. Run from the repository root (it makes a worktree of b09b1bf in /tmp/lt-b09b1bf, removed at
the end):
    python evidence/bench/linearized-python-2026-12-07-amd/ab_generate.py > ab_generate.txt
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OLD = "b09b1bf"
FORMATS = ["float32", "bf16", "int8"]


def one_process() -> None:  # (run with PYTHONPATH set to the source tree to measure)
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    import linear_transformers.linearize  # noqa: F401 (registers linear_llama)
    from linear_transformers.decode import DecodeConfig

    assert linear_transformers.__file__.startswith(os.environ["PYTHONPATH"]), linear_transformers.__file__

    model = AutoModelForCausalLM.from_pretrained("runs/lz-hybrid/model").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(1))
    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    out = {}
    for f in FORMATS:
        model.decode_config = DecodeConfig.precision(f)
        per_token = []
        for _ in range(2):
            stamps.clear()
            model.generate(ids, max_new_tokens=33, do_sample=False, pad_token_id=0,
                           logits_processor=LogitsProcessorList([Stamp()]))
            per_token += [b - a for a, b in zip(stamps[1:], stamps[2:])]  # (the first step follows the prefill)
        out[f] = per_token
    print(json.dumps(out))


def main() -> None:
    root = Path.cwd()
    old_tree = Path(f"/tmp/lt-{OLD}")
    subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), OLD], check=True, capture_output=True)
    try:
        trees = {"checked every token (b09b1bf)": old_tree / "src", "this commit": root / "src"}
        times = {(t, f): [] for t in trees for f in FORMATS}
        for _ in range(6):
            for name, src in trees.items():
                env = dict(os.environ, PYTHONPATH=str(src))
                run = subprocess.run(
                    [sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=True
                )
                for f, ts in json.loads(run.stdout.strip().splitlines()[-1]).items():
                    times[name, f] += ts
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], check=True, capture_output=True)
    from linear_transformers.results import machine_info

    print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("code,format,median_ms,min_ms,tokens")
    for (name, f), ts in times.items():
        print(f"{name},{f},{statistics.median(ts) * 1e3:.3f},{min(ts) * 1e3:.3f},{len(ts)}")
    for f in FORMATS:
        a, b = (statistics.median(times[n, f]) for n in trees)
        print(f"# {f}: {a * 1e3:.2f} -> {b * 1e3:.2f} ms per token, {a / b:.3f}x")


if __name__ == "__main__":
    one_process() if "--one" in sys.argv else main()
