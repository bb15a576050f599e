"""End-to-end training speed: tokens/s of one optimiser step of a whole model, linear attention on
the C kernel and on PyTorch's "chunked" against softmax, in float32 and under bfloat16 autocast.

    linear-transformers bench training             # 4 layers, d_model 256, T = 4096

Each arm is the same CausalTransformer (same seed, same weights) with its attention's backend set:

    linear-cpu      causal-linear attention, the C kernel (backend "cpu")
    linear-chunked  causal-linear attention, PyTorch's chunked algorithm (backend "chunked")
    softmax         causal softmax attention (scaled_dot_product_attention)

at each --precision: float32, or bf16 (torch.autocast on the CPU: the projections in bfloat16, the
attention ops take bfloat16 inputs). First the two linear arms are checked against each other on
one batch (loss and every gradient, in float32). Then, over --rounds rounds, each arm times one
step (forward, next-token loss, backward, AdamW update) in turn. Reports tokens per second,
median and best, and the ratio to softmax of the same precision. Writes training.csv, table.md and
training.png under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, provenance, write_csv, write_run_record

ARMS = {
    "linear-cpu": ("causal-linear", "cpu"),
    "linear-chunked": ("causal-linear", "chunked"),
    "softmax": ("causal-softmax", None),
}
PRECISIONS = ("float32", "bf16")


@dataclass
class TrainingOptions:
    length: int = count(4096, "tokens per sequence T")
    batch: int = count(1, "sequences per step")
    d_model: int = count(256, "model width")
    n_layers: int = count(4, "blocks")
    n_heads: int = count(8, "attention heads")
    arms: tuple[str, ...] = option(tuple(ARMS), "what to time", choices=tuple(ARMS))
    precisions: tuple[str, ...] = option(PRECISIONS, "float32 and/or bf16 autocast", choices=PRECISIONS)
    rounds: int = count(7, "rounds; each times one step of every arm")
    threads: int = option(torch.get_num_threads(), "CPU threads")
    quick: bool = option(False, "T = 256, 2 layers of 64, 2 rounds (seconds: a smoke test)")
    out: Path = option(Path("results/bench-training"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, TrainingOptions, title="benchmark")


def make_model(args, arm: str):
    from ..model import CausalTransformer

    attention, backend = ARMS[arm]
    cfg = ModelConfig(
        vocab_size=256,
        max_len=args.length,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        d_ff=4 * args.d_model,
        attention=attention,
    )
    torch.manual_seed(0)
    model = CausalTransformer(cfg)
    if backend is not None:
        for block in model.blocks:
            block.attn.backend = backend
    return model


def step_fn(model, tokens: torch.Tensor, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            loss = model.nll(tokens).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def verify(args, tokens: torch.Tensor) -> float:
    """Largest relative difference of loss and gradients between the C kernel and chunked (float32)."""
    grads = {}
    for arm in ("linear-cpu", "linear-chunked"):
        model = make_model(args, arm)
        loss = model.nll(tokens).mean()
        loss.backward()
        grads[arm] = [loss.detach()] + [p.grad for p in model.parameters()]
    a, b = grads["linear-cpu"], grads["linear-chunked"]
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))


def main(args: argparse.Namespace) -> int:
    started = provenance(getattr(args, "command_line", None))  # (run.json: what made the results)
    args = argparse.Namespace(**vars(args))
    if args.quick:
        args.length, args.d_model, args.n_layers, args.n_heads, args.rounds = 256, 64, 2, 4, 2
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    for line in isa_lines():
        print(line)
    from ..ops import cpu

    if "linear-cpu" in args.arms and not cpu.available():
        print(f"linear-cpu left out: the C kernel is unavailable ({cpu.unavailable_reason()})")
        args.arms = tuple(a for a in args.arms if a != "linear-cpu")
    tokens = torch.randint(0, 256, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    error = verify(args, tokens) if {"linear-cpu", "linear-chunked"} <= set(args.arms) else None
    if error is not None:
        print(f"linear-cpu = linear-chunked on one batch: largest relative difference {error:.1e}")
        if not error < 1e-3:
            raise SystemExit(f"bench training: the C kernel and chunked disagree ({error:.1e}); nothing timed")
    configs = [(arm, p) for p in args.precisions for arm in args.arms]
    steps = {c: step_fn(make_model(args, c[0]), tokens, c[1]) for c in configs}
    for step in steps.values():  # a first step each, untimed (first-use builds, allocator warm-up)
        step()
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            t = time.perf_counter()
            steps[c]()
            times[c].append(time.perf_counter() - t)
    n = args.batch * args.length
    rows = []
    for arm, precision in configs:
        med, best = statistics.median(times[arm, precision]), min(times[arm, precision])
        soft = times.get(("softmax", precision))
        rows.append(
            {
                "arm": arm,
                "precision": precision,
                "tokens": n,
                "median_s": med,
                "best_s": best,
                "tokens_per_s": n / med,
                "vs_softmax": statistics.median(soft) / med if soft else None,
                "verified_error": error,
            }
        )
    table = markdown_table(
        ["arm", "precision", "tokens/s (median)", "best", "x softmax"],
        [
            [r["arm"], r["precision"], f"{r['tokens_per_s']:.0f}", f"{n / r['best_s']:.0f}", fmt(r["vs_softmax"], 2)]
            for r in rows
        ],
    )
    head = (
        f"One training step (forward, loss, backward, AdamW) of a {args.n_layers}-layer CausalTransformer, d_model "
        f"{args.d_model}, {args.n_heads} heads, batch {args.batch} x T={args.length}; {args.rounds} rounds taking "
        f"turns; {info['cpu']}, {args.threads} threads, torch {info['torch']}\n" + "\n".join(isa_lines())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "training.csv", rows)
    (args.out / "table.md").write_text(head + "\n\n" + table)
    plot(rows, args.out / "training.png", f"training, T={args.length}, {info['cpu']}")
    print()
    print(table)
    write_run_record(args.out, started)
    print(f"wrote {args.out / 'training.csv'}, table.md, run.json, training.png")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [f"{r['arm']}\n{r['precision']}" for r in rows]
    ax.bar(
        range(len(rows)),
        [r["tokens_per_s"] for r in rows],
        color=["C0" if "linear" in r["arm"] else "C3" for r in rows],
    )
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("training tokens/s (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
