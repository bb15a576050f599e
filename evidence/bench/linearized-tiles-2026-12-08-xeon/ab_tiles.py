"""Batched decoding of the linearised SmolLM2-135M (hybrid, untrained maps: the same shapes and work as
a trained one) through the fused C step, the dot formats on AMX tiles against the row layout, side by
side: B rows, each after a 256-token prefill, one step per turn, every variant taking a turn in each
round; medians of ms per step and tokens/s (B / step). float32 weights as the reference users have.
Verified first: the tiles' logits against the row layout's, in the same state. Run from the
repository root on a CPU with AMX-BF16 and AMX-INT8:
    PYTHONPATH=src python evidence/bench/linearized-tiles-2026-12-08-xeon/ab_tiles.py \
        --batches 1 4 8 16 32 64 --rounds 7 --out evidence/bench/linearized-tiles-2026-12-08-xeon
writes tiles.csv, table.md, tiles.png and log.txt there.
"""

import argparse
import copy
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from linear_transformers.decode import DecodeConfig, llama
from linear_transformers.linearize import LinearizeConfig, LinearizedCache, from_linearized, linearize
from linear_transformers.linearize.step import fused_step
from linear_transformers.linearize.transfer import load_teacher
from linear_transformers.results import machine_info

p = argparse.ArgumentParser()
p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
p.add_argument("--rounds", type=int, default=7)
p.add_argument("--prefill", type=int, default=256)
p.add_argument("--out", type=Path, required=True)
args = p.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
lines_said = []


def say(*a):
    print(*a, flush=True)
    lines_said.append(" ".join(map(str, a)))
    (args.out / "log.txt").write_text("\n".join(lines_said) + "\n")


if not (llama.has_tiles(torch.bfloat16, torch.bfloat16) and llama.has_tiles(torch.int8, torch.int8)):
    sys.exit("ab_tiles: this CPU or build has no AMX tiles for the dot formats (llama.has_tiles)")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
say(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}; {' '.join(sys.argv)}")
torch.manual_seed(0)
_, teacher = load_teacher()
model = from_linearized(linearize(teacher, LinearizeConfig(mode="hybrid"))).eval()
del teacher
VARIANTS = [("float32", 0), ("bf16", 0), ("bf16", 1), ("int8-dot", 0), ("int8-dot", 1)]
steps = {f: fused_step(model, DecodeConfig.precision(f)) for f in ("float32", "bf16", "int8-dot")}
rows = []
for B in args.batches:
    ids = torch.randint(0, model.config.vocab_size, (B, args.prefill), generator=torch.Generator().manual_seed(B))
    cache = LinearizedCache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    base = [cache.states[i] for i in range(len(cache.states))]
    token = torch.randint(0, model.config.vocab_size, (B,), generator=torch.Generator().manual_seed(7))
    states = {v: copy.deepcopy(base) for v in VARIANTS}

    def call(v, s, token=token):
        step = steps[v[0]]
        step.struct.amx_rows = v[1]  # 1: tiles from one row on; 0: the row layout
        return step(token, s[0].seen.clone(), s)

    # verified first: each format's tiles and rows against the PyTorch model's own step (float32
    # weights) from the same state: the tiles no further from it than the rows (the narrow formats'
    # own error, which 30 layers of rounded inputs amplify, dwarfs the order of the sums)
    with torch.no_grad():
        ref_cache = LinearizedCache()
        ref_cache.states = copy.deepcopy(cache.states)
        ref_cache.seen = cache.seen
        model.decode_config = DecodeConfig(fused=False)
        want = model(token[:, None], cache=ref_cache, use_cache=True).logits[:, -1]
    scale = want.abs().max()
    for f in ("bf16", "int8-dot"):
        rows_err = ((call((f, 0), copy.deepcopy(base)) - want).abs().max() / scale).item()
        tiles_err = ((call((f, 1), copy.deepcopy(base)) - want).abs().max() / scale).item()
        say(f"B={B} {f}: max |logit - PyTorch float32| / max |logit|: rows {rows_err:.2e}, tiles {tiles_err:.2e}")
        assert tiles_err < 1.5 * rows_err + 1e-3, (B, f, rows_err, tiles_err)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            t0 = time.perf_counter()
            call(v, states[v])
            times[v].append(time.perf_counter() - t0)
    for v in VARIANTS:
        med = statistics.median(times[v])
        row = {
            "batch": B,
            "format": v[0],
            "tiles": v[1],
            "median_ms": round(1e3 * med, 2),
            "min_ms": round(1e3 * min(times[v]), 2),
            "tokens_per_s": round(B / med, 1),
        }
        rows.append(row)
        say(row)

with open(args.out / "tiles.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
get = {(r["batch"], r["format"], r["tiles"]): r for r in rows}
lines = [
    "| B | float32 ms | bf16 rows ms | bf16 tiles ms | bf16 tiles / rows | int8-dot rows ms | int8-dot tiles ms "
    "| int8-dot tiles / rows | best tokens/s |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for B in args.batches:
    r = {k: get[(B, *k)]["median_ms"] for k in VARIANTS}
    best = max(get[(B, *k)]["tokens_per_s"] for k in r)
    lines.append(
        f"| {B} | {r['float32', 0]} | {r['bf16', 0]} | {r['bf16', 1]} | {r['bf16', 0] / r['bf16', 1]:.2f}x "
        f"| {r['int8-dot', 0]} | {r['int8-dot', 1]} | {r['int8-dot', 0] / r['int8-dot', 1]:.2f}x | {best} |"
    )
(args.out / "table.md").write_text("\n".join(lines) + "\n")
say("\n".join(lines))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6, 4))
for v, style in zip(VARIANTS, ["k-", "C0--", "C0-", "C1--", "C1-"], strict=True):
    ax.plot(
        args.batches,
        [get[(B, *v)]["tokens_per_s"] for B in args.batches],
        style,
        marker="o",
        label=f"{v[0]} {'AMX tiles' if v[1] else 'row layout'}",
    )
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("batch rows")
ax.set_ylabel("tokens/s (median)")
ax.set_title("Fused decoding of linearised SmolLM2-135M, batched")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(args.out / "tiles.png", dpi=120)
