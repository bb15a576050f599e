"""Causal attention: time and peak memory against sequence length, linear attention's backends vs softmax
(--figure1: the paper's Figure 1 with the LSH baselines, see bench/figure1.py).

Implementations, all with feature-mapped q, k of [B, N, H, D] and the normaliser included:

    naive     quadratic masked linear attention (the reference; skipped where N^2 does not fit)
    chunked   causal_linear_attention(backend="chunked"): the chunkwise PyTorch path
    cpu       causal_linear_attention(backend="cpu"): the compiled C kernel (CPU only)
    cpu-f32   the same kernel on float32 inputs whatever --dtype says: with --dtype bfloat16, the
              kernel's bfloat16 path against its own float32 in the same rounds (not in the defaults)
    auto      causal_linear_attention(backend="auto"): what users get ("cpu" where it measured faster here)
    softmax   torch's causal scaled_dot_product_attention on head-major contiguous inputs (its best case)

First every length is verified (each linear implementation against the token-by-token recurrence,
gradients against the naive reference, softmax against an explicit softmax), then forward and
forward+backward are timed and the extra peak memory of forward+backward is measured. Writes
attention.csv, table.md and attention.png under --out.

--isa LEVEL... (or all) runs the benchmark once per ISA level of the C kernels, each in its own
process with PyTorch capped to that level (bench/levels.py), and adds levels.csv, levels.md and
levels.png: the levels side by side, with the kernel's speed-up over "chunked" and SDPA measured in
the same process.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import naive
from ..options import add_options, count, option
from ..results import (
    finish_log_log,
    fmt,
    isa_lines,
    machine_info,
    markdown_table,
    provenance,
    write_csv,
    write_run_record,
)
from . import figure1, levels
from .attention_levels import per_level
from .measure import batched_gemm_gflops, peak_extra_memory, rel_error

IMPLS = ("naive", "chunked", "cpu", "cpu-f32", "auto", "softmax")
FAST = ("chunked", "cpu", "cpu-f32", "auto")
DEFAULT_OUT = Path("results/bench_attention")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AttentionOptions:
    lengths: list[int] = count([512, 1024, 2048, 4096, 8192, 16384], "sequence lengths N")
    batch: int = count(1, "sequences per call")
    heads: int = count(8, "attention heads")
    dim: int = count(64, "head dimension (Dk = Dv)")
    chunk_size: int = count(64, "chunk of the chunkwise algorithm")
    dtype: str = option("float32", "input dtype", choices=list(DTYPES))
    impls: list[str] = option([i for i in IMPLS if i != "cpu-f32"], "what to time", choices=IMPLS)
    threads: int = option(torch.get_num_threads(), "CPU threads")
    repeats: int = count(5, "interleaved rounds per length (each implementation timed once per round; median and min)")
    naive_limit_gib: float = option(4.0, "skip naive above this many GiB of N^2 scores")
    out: Path = option(DEFAULT_OUT, "output folder (--figure1: results/figure1)")
    device: str = option("cpu", "where to run: cpu or cuda")
    quick: bool = option(False, "tiny sizes, one repeat: a smoke test in seconds")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, AttentionOptions, title="benchmark")
    figure1.add_figure1_arguments(p)
    levels.add_isa_argument(p)


def chunked_flops(N: int, B: int, H: int, Dk: int, Dv: int, C: int, backward: bool) -> float:
    """FLOPs (2 per multiply-add) of the chunked algorithm's GEMMs, normaliser fused as column Dv + 1.

    Forward, per token: Q K^T and A V~ (intra-chunk), K^T V~ and Q U (inter-chunk). The backward has
    twice each: dnum V~^T, dA K, dA^T Q, A^T dnum and dnum U^T, Q^T dnum, V~ G^T, K G.
    """
    T = math.ceil(N / C) * C
    intra = 2 * C * Dk + 2 * C * (Dv + 1)
    inter = 2 * (2 * Dk * (Dv + 1))
    return float(B * H * T * (intra + inter) * (3 if backward else 1))


def make_inputs(B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.elu(torch.randn(B, N, H, D, generator=g)) + 1
    k = F.elu(torch.randn(B, N, H, D, generator=g)) + 1
    v = torch.randn(B, N, H, D, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def impl_dtype(args, impl: str) -> torch.dtype:
    """The dtype an implementation's inputs are made in: --dtype, except float32 for "cpu-f32"."""
    return torch.float32 if impl == "cpu-f32" else DTYPES[args.dtype]


def _attention(impl: str, q, k, v, chunk_size: int):
    """Returns a function running the implementation forward; inputs in [B, N, H, D]."""
    if impl == "naive":
        return lambda: ops.causal_linear_attention(q, k, v, backend="naive")
    if impl in FAST:
        backend = "cpu" if impl == "cpu-f32" else impl
        return lambda: ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=chunk_size)
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

    sdpa.inputs = (qh, kh, vh)
    return sdpa


def verify(args, lengths: list[int]) -> list[str]:
    """Check every implementation on the benchmark's own inputs; returns the report lines, raises on failure."""
    lines = []
    dtype = DTYPES[args.dtype]
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    fast = [impl for impl in args.impls if impl in FAST]
    for N in lengths:
        q, k, v = make_inputs(args.batch, N, args.heads, args.dim, dtype, args.device, seed=N)
        with torch.no_grad():
            ref, _ = naive.causal_linear_attention_recurrent(q.double(), k.double(), v.double())
            for impl in fast:
                x = [t.to(impl_dtype(args, impl)) for t in (q, k, v)]
                err = rel_error(_attention(impl, *x, args.chunk_size)(), ref)
                lines.append(f"N={N}: {impl} vs token-by-token recurrence (float64): rel. error {err:.1e}")
                if not err < tol:
                    raise SystemExit(f"verification failed: {impl} differs from the recurrence at N={N}: {err:.2e}")
    # Gradients and softmax on a short, awkward length (not a multiple of the chunk).
    N = max(2, min(lengths) - 1)
    q, k, v = make_inputs(args.batch, N, args.heads, args.dim, torch.float64, args.device, seed=0)
    for x in (q, k, v):
        x.requires_grad_(True)

    def outputs_and_grads(backend):
        out = ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=args.chunk_size)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    reference = outputs_and_grads("naive")
    for impl in [i for i in fast if i != "cpu-f32"]:  # (the float64 kernel is the same for both)
        err = max(rel_error(a, b) for a, b in zip(outputs_and_grads(impl), reference, strict=True))
        lines.append(f"N={N}: {impl} vs naive, outputs and dq/dk/dv (float64): rel. error {err:.1e}")
        if not err < 1e-10:
            raise SystemExit(f"verification failed: {impl} gradients differ from the naive reference: {err:.2e}")
    with torch.no_grad():
        sdpa = _attention("softmax", q, k, v, args.chunk_size)().transpose(1, 2)
        ref = naive.softmax_attention(q, k, v, causal=True)
    err = rel_error(sdpa, ref)
    lines.append(f"N={N}: softmax (SDPA) vs explicit softmax (float64): rel. error {err:.1e}")
    if not err < 1e-10:
        raise SystemExit(f"verification failed: SDPA differs from the explicit softmax: {err:.2e}")
    return lines


def prepare(args, impl: str, N: int):
    """One implementation at length N: its row (sizes; or why it is skipped), and its forward and
    forward+backward as callables on their own inputs, for measure_interleaved."""
    dtype = impl_dtype(args, impl)
    B, H, D = args.batch, args.heads, args.dim
    row = {"impl": impl, "N": N, "batch": B, "heads": H, "dim": D, "dtype": str(dtype)[6:], "threads": args.threads}
    if impl == "naive" and B * H * N * N * 8 * 3 > args.naive_limit_gib * 2**30:
        row["skipped"] = f"N^2 scores exceed {args.naive_limit_gib} GiB"
        return row, None, None
    device = torch.device(args.device)
    q, k, v = make_inputs(B, N, H, D, dtype, args.device, seed=N)
    fwd_run = _attention(impl, q, k, v, args.chunk_size)

    def fwd():
        with torch.no_grad():
            fwd_run()

    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    run = _attention(impl, qg, kg, vg, args.chunk_size)
    grad_out = torch.randn(B, N, H, D, dtype=dtype, device=device)
    if impl == "softmax":
        grad_out = grad_out.transpose(1, 2).contiguous()
    inputs = (qg, kg, vg) if impl != "softmax" else None

    def fwd_bwd():
        out = run()
        out = out[0] if isinstance(out, tuple) else out
        # autograd.grad returns fresh gradients instead of accumulating into .grad, the same for every impl
        torch.autograd.grad(out, inputs or run.inputs, grad_out)

    return row, fwd, fwd_bwd


def measure_interleaved(args, N: int, impls: list[str]) -> list[dict]:
    """Every implementation at length N, taking turns: each round times each one's forward, then
    each one's forward+backward, the order rotating between rounds, so that a slow moment of the
    machine (or an allocator handing out fresh pages) hits all of them. Median and min per
    implementation (users meet the median); then the extra peak memory of forward+backward."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prepared = [prepare(args, impl, N) for impl in impls]
    live = [(row, f, fb) for row, f, fb in prepared if f is not None]
    repeats = 1 if args.quick else args.repeats
    times = {id(row): {"fwd": [], "fwdbwd": []} for row, _, _ in live}
    for _, f, fb in live:  # warm-up: first calls compile, time and allocate
        f(), fb()
    for rnd in range(repeats):
        order = live[rnd % len(live) :] + live[: rnd % len(live)] if live else []
        for kind in ("fwd", "fwdbwd"):
            for row, f, fb in order:
                sync()
                t0 = time.perf_counter()
                (f if kind == "fwd" else fb)()
                sync()
                times[id(row)][kind].append((time.perf_counter() - t0) * 1e3)
    for row, _, fb in live:
        t = times[id(row)]
        row.update(
            fwd_ms=statistics.median(t["fwd"]),
            fwd_min_ms=min(t["fwd"]),
            fwdbwd_ms=statistics.median(t["fwdbwd"]),
            fwdbwd_min_ms=min(t["fwdbwd"]),
            fwdbwd_peak_mib=peak_extra_memory(fb, device) / 2**20,
            repeats=repeats,
        )
        if row["impl"] in FAST:
            C = args.chunk_size
            row["fwd_gflops"] = chunked_flops(N, row["batch"], row["heads"], row["dim"], row["dim"], C, False) / (
                row["fwd_ms"] * 1e6
            )
            row["fwdbwd_gflops"] = chunked_flops(N, row["batch"], row["heads"], row["dim"], row["dim"], C, True) / (
                row["fwdbwd_ms"] * 1e6
            )
    return [row for row, _, _ in prepared]


def measure(args, impl: str, N: int) -> dict:
    """One implementation alone (measure_interleaved over one)."""
    return measure_interleaved(args, N, [impl])[0]


def auto_interleaved(args: argparse.Namespace, N: int, faster: str, clock=time.perf_counter) -> tuple[dict, list[dict]]:
    """ "auto" against `faster` ("cpu" or "chunked", whichever measured faster above), forward+
    backward, the two timed back to back in each of --repeats rounds, who goes first swapping each
    round. Separate timings of the same kernel differ by the host's drift, which moves both of a pair
    alike, and by where a call sits in the sequence (first or second of its pair; with an odd count
    of rounds, a median over all of them takes the majority order's side). `auto_vs_best` is the
    geometric mean of the median ratio auto / faster over the rounds auto went first and over those
    it went second, which cancels both; `auto_vs_best_min` is the ratio of the two best times, which
    one quiet moment sways. Returns that row and one row per round (its order and both times)."""
    q, k, v = make_inputs(args.batch, N, args.heads, args.dim, DTYPES[args.dtype], args.device, seed=N)
    for x in (q, k, v):
        x.requires_grad_(True)
    grad_out = torch.randn_like(v)

    def fwd_bwd(impl):
        run = _attention(impl, q, k, v, args.chunk_size)
        return lambda: torch.autograd.grad(run(), (q, k, v), grad_out)

    fns = {"auto": fwd_bwd("auto"), faster: fwd_bwd(faster)}
    for fn in fns.values():
        fn()
    rounds = []
    for r in range(2 if args.quick else max(2, args.repeats)):
        order = list(fns)[:: 1 if r % 2 == 0 else -1]
        times = {}
        for name in order:
            t0 = clock()
            fns[name]()
            times[name] = clock() - t0
        rounds.append(
            {
                "N": N,
                "round": r,
                "first": order[0],
                "auto_ms": times["auto"] * 1e3,
                "faster_ms": times[faster] * 1e3,
                "ratio": times["auto"] / times[faster],
            }
        )
    by_order = [
        statistics.median(x["ratio"] for x in rounds if (x["first"] == "auto") == first) for first in (True, False)
    ]
    best = {"auto": min(x["auto_ms"] for x in rounds), faster: min(x["faster_ms"] for x in rounds)}
    row = {
        "N": N,
        "faster": faster,
        "rounds": len(rounds),
        "auto_fwdbwd_ms": best["auto"],
        "faster_fwdbwd_ms": best[faster],
        "auto_vs_best": math.sqrt(by_order[0] * by_order[1]),
        "auto_first_ratio": by_order[0],
        "auto_second_ratio": by_order[1],
        "auto_vs_best_min": best["auto"] / best[faster],
    }
    return row, rounds


def summary_table(rows: list[dict]) -> str:
    """One row per (N, implementation), with speedups over softmax measured in the same run."""
    softmax = {r["N"]: r for r in rows if r["impl"] == "softmax" and "fwd_ms" in r}
    header = [
        "N",
        "impl",
        "fwd ms (median)",
        "fwd+bwd ms (median)",
        "fwd+bwd min",
        "fwd vs softmax",
        "fwd+bwd vs softmax",
        "peak MiB",
        "GFLOP/s",
    ]
    out = []
    for r in sorted(rows, key=lambda r: (r["N"], IMPLS.index(r["impl"]))):
        if "fwd_ms" not in r:
            out.append([str(r["N"]), r["impl"], "skipped", "", "", "", "", "", ""])
            continue
        s = softmax.get(r["N"])
        speed = (
            ["-", "-"]
            if s is None or r["impl"] == "softmax"
            else [
                fmt(s["fwd_ms"] / r["fwd_ms"]) + "x",
                fmt(s["fwdbwd_ms"] / r["fwdbwd_ms"]) + "x",
            ]
        )
        out.append(
            [
                str(r["N"]),
                r["impl"],
                fmt(r["fwd_ms"]),
                fmt(r["fwdbwd_ms"]),
                fmt(r.get("fwdbwd_min_ms")),
                *speed,
                fmt(r["fwdbwd_peak_mib"]),
                fmt(r.get("fwdbwd_gflops"), 0),
            ]
        )
    return markdown_table(header, out)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {
        "naive": "tab:gray",
        "chunked": "tab:blue",
        "cpu": "tab:green",
        "cpu-f32": "tab:cyan",
        "auto": "tab:olive",
        "softmax": "tab:red",
    }
    for impl in IMPLS:
        pts = sorted((r["N"], r) for r in rows if r["impl"] == impl and "fwd_ms" in r)
        if not pts:
            continue
        Ns = [n for n, _ in pts]
        ax_t.plot(Ns, [r["fwdbwd_ms"] for _, r in pts], "o-", color=colors[impl], label=f"{impl} fwd+bwd")
        ax_t.plot(Ns, [r["fwd_ms"] for _, r in pts], "s--", color=colors[impl], alpha=0.6, label=f"{impl} fwd")
        mem = [(n, r["fwdbwd_peak_mib"]) for n, r in pts if r["fwdbwd_peak_mib"] == r["fwdbwd_peak_mib"]]
        if mem:
            ax_m.plot([n for n, _ in mem], [m for _, m in mem], "o-", color=colors[impl], label=impl)
    finish_log_log(fig, [(ax_t, "time (ms)"), (ax_m, "extra peak memory, fwd+bwd (MiB)")], title, path)
    return True


def main(args: argparse.Namespace) -> int:
    if args.figure1:
        if args.out == DEFAULT_OUT:
            args.out = Path("results/figure1")
        return figure1.main(args)
    if args.quick:
        args.lengths, args.heads, args.dim, args.repeats = [128, 256], 2, 16, 1
    if args.isa:
        return per_level(args)
    started = provenance(getattr(args, "command_line", None))  # (run.json: what made the results)
    if {"cpu", "cpu-f32"} & set(args.impls) and (args.device != "cpu" or not ops.cpu.available()):
        why = "not a CPU run" if args.device != "cpu" else ops.cpu.unavailable_reason()
        print(f"skipping impls 'cpu', 'cpu-f32': {why}", file=sys.stderr)
        args.impls = [i for i in args.impls if i not in ("cpu", "cpu-f32")]
    torch.set_num_threads(args.threads)
    info = machine_info()
    config = (
        f"B={args.batch} H={args.heads} D={args.dim} {args.dtype} chunk={args.chunk_size} "
        f"threads={args.threads} device={args.device}"
    )
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}"
        + (f", {info['gpu']}" if "gpu" in info else "")
    )
    print(f"config:  {config}")
    for line in isa_lines():
        print(line)
    print("verifying ...", flush=True)
    for line in verify(args, args.lengths):
        print("  " + line)
    gemm = batched_gemm_gflops() if args.device == "cpu" and not args.quick else float("nan")
    if gemm == gemm:
        print(f"batched 64x64x64 float32 matmul on this machine: {gemm:.0f} GFLOP/s")
    rows = []
    for N in args.lengths:
        for row in measure_interleaved(args, N, list(args.impls)):
            impl = row["impl"]
            rows.append(row)
            if "skipped" in row:
                print(f"  N={N:>6} {impl:>8}: skipped ({row['skipped']})", flush=True)
            else:
                print(
                    f"  N={N:>6} {impl:>8}: fwd {row['fwd_ms']:9.1f} ms  fwd+bwd {row['fwdbwd_ms']:9.1f} ms "
                    f"(median; min {row['fwdbwd_min_ms']:.1f})  "
                    f"peak {fmt(row['fwdbwd_peak_mib'])} MiB",
                    flush=True,
                )
    out = args.out
    write_csv(out / "attention.csv", rows)
    table = summary_table(rows)
    if args.device == "cpu" and {"auto", "cpu", "chunked"} <= set(args.impls) and ops.cpu.available():
        fb = {(r["N"], r["impl"]): r["fwdbwd_ms"] for r in rows if "fwdbwd_ms" in r}
        pairs = [auto_interleaved(args, N, min(("cpu", "chunked"), key=lambda i: fb[(N, i)])) for N in args.lengths]
        auto_rows = [row for row, _ in pairs]
        write_csv(out / "auto.csv", auto_rows)
        write_csv(out / "auto_rounds.csv", [r for _, rounds in pairs for r in rounds])
        table += (
            '\n"auto" / the faster of "cpu" and "chunked", forward+backward, paired rounds: '
            + ", ".join(f"N={r['N']} {r['auto_vs_best']:.2f}" for r in auto_rows)
            + "\n"
        )
    if {"cpu", "cpu-f32"} <= set(args.impls) and args.dtype != "float32":
        by = {(r["N"], r["impl"]): r for r in rows if "fwdbwd_ms" in r}
        pairs = [(N, by.get((N, "cpu-f32")), by.get((N, "cpu"))) for N in args.lengths]
        table += (
            f'\n"cpu-f32" (float32) / "cpu" ({args.dtype}), medians of the same rounds, fwd | fwd+bwd: '
            + ", ".join(
                f"N={N} {f['fwd_ms'] / c['fwd_ms']:.2f}x | {f['fwdbwd_ms'] / c['fwdbwd_ms']:.2f}x"
                for N, f, c in pairs
                if f and c
            )
            + "\n"
        )
    machine = info["gpu"] if args.device.startswith("cuda") and "gpu" in info else info["cpu"]
    import os

    allocator = f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
    header = (
        f"Causal attention, {config}; median (and min) of {args.repeats} interleaved rounds; allocator: "
        f"{allocator}\n\nMachine: {machine}, torch {info['torch']}\n"
    )
    header += "".join(line + "\n" for line in isa_lines())
    if gemm == gemm:
        header += f"Batched 64x64x64 float32 matmul rate measured in the same run: {gemm:.0f} GFLOP/s\n"
    (out / "table.md").write_text(header + "\n" + table)
    write_run_record(out, started)
    print()
    print(table)
    plotted = plot(rows, out / "attention.png", f"causal attention, {config}\n{machine}")
    print(f"wrote {out / 'attention.csv'}, {out / 'table.md'}" + (f", {out / 'attention.png'}" if plotted else ""))
    if not plotted:
        print("(no plot: matplotlib is not installed)", file=sys.stderr)
    return 0
