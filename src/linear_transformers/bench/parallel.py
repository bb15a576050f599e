"""Context parallelism: strong scaling of causal linear attention and of a model's training step
over the ranks of this machine, and a model of more ranks.

    linear-transformers bench parallel             # 64k, 256k and 1M tokens on 1 and 2 ranks

Each configuration runs in fresh processes (torch.multiprocessing, gloo on loopback) that share the
machine's threads evenly. 1 rank is the plain single-process call; W ranks each hold T / W tokens of
one sequence and call `ops.context_parallel_causal_linear_attention`. Per length and rank count it
times (median of --repeats, the slowest rank's time):

    attention   forward + backward of causal linear attention, B=1, --heads x --dim, float32
    model       forward + backward of a 2-block causal-linear CausalTransformer (d_model 64) on the
                whole sequence: the training step, its activations split over the ranks

and the peak resident memory of the largest rank. At the first length every rank first checks its
outputs and gradients against one process computing the whole sequence. Then it measures one
all_gather of the exchanged state on 2 ranks and projects the time at more ranks, the model on paper:
time(W) = compute(T / W) + exchanges x all_gather(W) (compute measured at 1 rank, the all_gather
taken as linear in W). Writes parallel.csv, model.csv, table.md and parallel.png under --out.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, provenance, write_csv, write_run_record

KINDS = ("attention", "model")


@dataclass
class ParallelOptions:
    lengths: list[int] = option([65536, 262144, 1048576], "sequence lengths T", metavar="T")
    ranks: list[int] = option([1, 2], "rank counts to measure", metavar="W")
    heads: int = count(4, "attention heads H")
    dim: int = count(32, "head dimension (Dk = Dv)")
    repeats: int = count(3, "timed runs per configuration (after one warm-up)")
    threads: int = option(os.cpu_count() or 1, "threads shared by the ranks of a configuration")
    quick: bool = option(False, "T = 2048 and 4096, 1 repeat (seconds: a smoke test)")
    out: Path = option(Path("results/bench-parallel"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ParallelOptions, title="benchmark")


def _inputs(T: int, H: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(1, T, H, D, generator=g) + 0.05
    k = torch.rand(1, T, H, D, generator=g) + 0.05
    v = torch.randn(1, T, H, D, generator=g)
    return q, k, v


def _model():
    from ..model import CausalTransformer, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_len=1024, chunk_size=64)
    return CausalTransformer(cfg)


def _attention_step(q, k, v, group):
    from .. import ops

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    if group is None:
        out = ops.causal_linear_attention(q, k, v)
    else:
        out = ops.context_parallel_causal_linear_attention(q, k, v, group)
    out.square().sum().backward()  # (a sum: a segment's gradients are the whole's there)
    return out.detach(), (q.grad, k.grad, v.grad)


def _model_step(model, tokens, group):
    model.zero_grad(set_to_none=True)
    nll = model.nll(tokens, context_group=group)
    (nll.sum() / tokens.numel()).backward()
    # (under context parallelism a rank may not use every parameter: the start token is the first's)
    return nll.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]


def _worker(rank, world, port, kind, T, H, D, repeats, threads, verify, results):
    import torch.distributed as dist

    from ..ops import parallel

    torch.set_num_threads(threads)
    group = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    a, b = parallel.segment(T, rank, world)
    if kind == "attention":
        q, k, v = _inputs(T, H, D)
        mine = [x[:, a:b].contiguous() for x in (q, k, v)]

        def step():
            return _attention_step(*mine, group)
    else:
        model = _model()
        tokens = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))

        def step():
            return _model_step(model, tokens, group)

    error = float("nan")
    if verify:
        out, grads = step()
        if kind == "attention":
            ref_out, ref_grads = _attention_step(q, k, v, None)
            pairs = [(out, ref_out[:, a:b]), *((g, r[:, a:b]) for g, r in zip(grads, ref_grads, strict=True))]
        else:
            ref_nll, ref_grads = _model_step(_model(), tokens, None)
            pairs = [(out, ref_nll[:, a:b])]
            if group is not None:  # (a rank's gradients are its segment's share: their sum is the whole)
                for g in grads:
                    dist.all_reduce(g, group=group)
            pairs += list(zip(grads, ref_grads, strict=True))
        error = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in pairs)
    times = []
    for i in range(repeats + 1):
        if group is not None:
            dist.barrier(group)
        t0 = time.perf_counter()
        step()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        if i:
            times.append(t.item())
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0], dtype=torch.float64)
    err = torch.tensor([error], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(err, op=dist.ReduceOp.MAX, group=group)
    if rank == 0:
        results.put({"times": times, "peak": peak.item(), "error": err.item()})
    if group is not None:
        dist.destroy_process_group()


def _exchange_worker(rank, world, port, numbers, repeats, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(numbers)
    parts = [torch.empty_like(x) for _ in range(world)]
    times = []
    for _ in range(repeats + 3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather(parts, x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        results.put(statistics.median(times[3:]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(fn, args=(world, _free_port(), *args, results), nprocs=world, join=True)
    return results.get()


def main(args: argparse.Namespace) -> int:
    started = provenance(getattr(args, "command_line", None))  # (run.json: what made the results)
    from ..ops import parallel

    lengths, repeats = ([2048, 4096], 1) if args.quick else (args.lengths, args.repeats)
    if any(T < max(args.ranks) for T in lengths) or min(args.ranks) < 1:
        raise ValueError(f"--ranks must be >= 1 and no more than the shortest length, got {args.ranks}")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads in all")
    for line in isa_lines():
        print(line)
    rows = []
    for i, T in enumerate(lengths):
        for kind in KINDS:
            for W in args.ranks:
                threads = max(1, args.threads // W)
                r = _spawn(_worker, W, kind, T, args.heads, args.dim, repeats, threads, i == 0)
                if i == 0 and not r["error"] < 1e-4:
                    raise SystemExit(
                        f"verification failed: {kind} on {W} ranks differs from one process "
                        f"(relative error {r['error']:.2e})"
                    )
                row = {
                    "kind": kind,
                    "T": T,
                    "ranks": W,
                    "threads_per_rank": threads,
                    "median_s": statistics.median(r["times"]),
                    "best_s": min(r["times"]),
                    "peak_rss_gib_per_rank": r["peak"] / 2**30,
                    "verified_error": r["error"],
                }
                rows.append(row)
                verified = f", verified ({r['error']:.1e})" if i == 0 else ""
                peak = row["peak_rss_gib_per_rank"]
                print(
                    f"  {kind:9s} T={T:8d} W={W}: median {row['median_s']:.3f} s,",
                    f"peak {peak:.2f} GiB per rank{verified}",
                    flush=True,
                )
    numbers = parallel.exchanged_numbers(1, 1, args.heads, args.dim, args.dim)
    gather_s = _spawn(_exchange_worker, 2, numbers, 20)
    projected = project(rows, lengths[-1], gather_s, numbers)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "parallel.csv", rows)
    write_csv(args.out / "model.csv", projected)
    base = {(r["kind"], r["T"]): r["median_s"] for r in rows if r["ranks"] == 1}
    table = markdown_table(
        ["kind", "T", "ranks", "median s", "best s", "speed-up", "peak GiB per rank"],
        [
            [
                r["kind"],
                str(r["T"]),
                str(r["ranks"]),
                fmt(r["median_s"], 3),
                fmt(r["best_s"], 3),
                fmt(base[(r["kind"], r["T"])] / r["median_s"], 2) if (r["kind"], r["T"]) in base else "-",
                fmt(r["peak_rss_gib_per_rank"], 2),
            ]
            for r in rows
        ],
    )
    model_table = markdown_table(
        ["ranks", "tokens per rank", "compute s", "exchanged KiB per rank", "exchange s", "projected s", "efficiency"],
        [
            [
                str(p["ranks"]),
                str(p["tokens_per_rank"]),
                fmt(p["compute_s"], 4),
                fmt(p["exchanged_kib"], 1),
                fmt(p["exchange_s"], 5),
                fmt(p["projected_s"], 4),
                f"{p['efficiency']:.0%}",
            ]
            for p in projected
        ],
    )
    header = (
        f"Context parallelism, B=1 H={args.heads} D={args.dim} float32, forward + backward, {args.threads} threads "
        f"shared by the ranks, gloo on loopback, median of {repeats}; {info['cpu']}, torch {info['torch']}\n"
        + "".join(line + "\n" for line in isa_lines())
    )
    model_header = (
        f"\nThe model on paper for attention at T={lengths[-1]}: compute measured at 1 rank divided by W; one "
        f"all_gather of a {numbers * 4 / 1024:.1f} KiB state per rank measured at {gather_s * 1e6:.0f} us on 2 ranks, "
        "taken as linear in W, 2 per call (forward and backward).\n\n"
    )
    (args.out / "table.md").write_text(header + "\n" + table + model_header + model_table)
    print(table + model_header + model_table)
    plotted = plot(rows, args.out / "parallel.png", f"context parallelism, {info['cpu']}")
    write_run_record(args.out, started)
    print(f"wrote {args.out}/parallel.csv, model.csv, table.md, run.json" + (", parallel.png" if plotted else ""))
    return 0


def project(rows: list[dict], T: int, gather_s: float, numbers: int) -> list[dict]:
    """Projected attention time at T on W ranks from the 1-rank time and the 2-rank all_gather."""
    one = [r for r in rows if r["kind"] == "attention" and r["T"] == T and r["ranks"] == 1]
    if not one:
        return []
    compute = one[0]["median_s"]
    out = []
    for W in (1, 2, 4, 8, 16, 32, 64):
        exchange = 0.0 if W == 1 else 2 * gather_s * (W - 1)
        t = compute / W + exchange
        out.append(
            {
                "ranks": W,
                "tokens_per_rank": T // W,
                "compute_s": compute / W,
                "exchanged_kib": 2 * W * numbers * 4 / 1024 if W > 1 else 0.0,
                "exchange_s": exchange,
                "projected_s": t,
                "efficiency": compute / (W * t),
            }
        )
    return out


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind in zip(axes, KINDS, strict=True):
        for W in sorted({r["ranks"] for r in rows}):
            pts = [(r["T"], r["median_s"]) for r in rows if r["kind"] == kind and r["ranks"] == W]
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{W} rank" + ("s" if W > 1 else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("forward + backward, median s")
        ax.set_title(kind)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
