"""The paper's Figure 1 on this machine: time and peak memory per sample of one causal attention layer
for softmax, linear and Reformer (LSH) attention against the sequence length.

    linear        ops.causal_linear_attention, backend "auto" (the compiled CPU kernel here)
    softmax       torch's scaled_dot_product_attention, causal (its fused, memory-efficient kernel)
    softmax-math  the same with SDPA's math backend: the explicit N x N scores, as softmax attention
                  was computed when the paper was written (quadratic memory)
    lsh-R         ops.lsh_attention with R hashing rounds, chunks of --lsh-chunk positions and
                  N / lsh-chunk buckets (Reformer's average bucket)

As in the paper, the batch shrinks as N grows (--tokens per batch, at least one sequence), and time
and memory are divided by the batch: per sample. Every implementation is first checked against its
reference on the benchmark's shapes; then each (method, N) is timed forward+backward and forward
only, and its extra peak memory (fwd+bwd) measured. A point is skipped, and marked so, when its
estimated peak memory exceeds --memory-gib or its time, extrapolated from the previous length, exceeds
--max-seconds. Writes figure1.csv, figure1.png (two log-log panels like the paper's), table.md and run.json.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from ..ops import lsh, naive
from ..options import add_options, count, option
from ..results import finish_log_log, fmt, machine_info, markdown_table, provenance, write_csv, write_run_record
from .measure import peak_extra_memory, rel_error

METHODS = ("softmax", "softmax-math", "linear", "lsh-1", "lsh-4", "lsh-8")
COLORS = {
    "softmax": "tab:red",
    "softmax-math": "tab:orange",
    "linear": "tab:blue",
    "lsh-1": "tab:green",
    "lsh-4": "tab:olive",
    "lsh-8": "tab:purple",
}


@dataclass
class Figure1Options:
    figure1: bool = option(False, "the paper's Figure 1 (options below; see the module doc)")
    fig_lengths: list[int] = count([2**i for i in range(9, 17)], "sequence lengths of the figure")
    fig_methods: list[str] = option(list(METHODS), "attention methods of the figure", choices=METHODS)
    tokens: int = count(2**14, "tokens per batch: batch = max(1, tokens // N)")
    lsh_chunk: int = count(32, "sorted positions per LSH chunk")
    max_seconds: float = option(60.0, "skip a point predicted to take longer")
    memory_gib: float = option(12.0, "skip a point estimated to need more")


def add_figure1_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, Figure1Options, title="--figure1")


def _inputs(method: str, B: int, N: int, H: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    if method == "linear":
        return [F.elu(q) + 1, F.elu(k) + 1, v]
    if method.startswith("lsh"):
        return [q, v]
    return [x.transpose(1, 2).contiguous() for x in (q, k, v)]  # SDPA's head-major layout


def _function(method: str, N: int, chunk: int):
    if method == "linear":
        return lambda q, k, v: ops.causal_linear_attention(q, k, v)
    if method.startswith("lsh"):
        R = int(method.split("-")[1])
        n_buckets = max(2, 2 * math.ceil(N / chunk / 2))
        return lambda qk, v: ops.lsh_attention(qk, v, causal=True, n_hashes=R, n_buckets=n_buckets, chunk_size=chunk)
    if method == "softmax-math":

        def math_softmax(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return math_softmax
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def peak_bytes(method: str, B: int, N: int, H: int, D: int, chunk: int) -> float:
    """Estimated peak memory of one fwd+bwd for the methods whose memory can explode (measured on
    this machine: softmax-math holds 3 N x N float32 tensors per head; LSH ~64 bytes per (token,
    head, round) for each of its 2 * chunk scores and D features: 16 GiB for lsh-8 at N = 32768)."""
    if method == "softmax-math":
        return 3 * 4.0 * B * H * N * N  # scores, probabilities, their gradient
    if method.startswith("lsh"):
        return 64.0 * (2 * chunk + D) * int(method.split("-")[1]) * B * H * N
    return 0.0


def verify(args) -> list[str]:
    """Each method against its reference, float64, on an awkward length (not a multiple of the chunks)."""
    N, H, D = 3 * args.lsh_chunk + 5, 2, 16
    lines = []
    q, k, v = _inputs("linear", 2, N, H, D, 0)  # float32: the backend that is timed
    ref, _ = naive.causal_linear_attention(q.double(), k.double(), v.double())
    err = rel_error(ops.causal_linear_attention(q, k, v), ref)
    lines.append(f"linear (float32) vs naive quadratic form (float64): rel. error {err:.1e}")
    ok = err < 1e-5
    qh, kh, vh = (x.double() for x in _inputs("softmax", 2, N, H, D, 1))
    ref = naive.softmax_attention(*(x.transpose(1, 2) for x in (qh, kh, vh)), causal=True).transpose(1, 2)
    for method in ("softmax", "softmax-math"):
        err = rel_error(_function(method, N, args.lsh_chunk)(qh, kh, vh), ref)
        lines.append(f"{method} vs explicit softmax: rel. error {err:.1e}")
        ok &= err < 1e-10
    qk, v = (x.double() for x in _inputs("lsh-4", 2, N, H, D, 2))
    for R in (1, 4, 8):
        n_buckets = max(2, 2 * math.ceil(N / args.lsh_chunk / 2))
        rot = lsh.random_rotations(H, D, R, n_buckets, dtype=torch.float64)
        out = ops.lsh_attention(
            qk, v, causal=True, n_hashes=R, n_buckets=n_buckets, chunk_size=args.lsh_chunk, rotations=rot
        )
        err = rel_error(out, naive.lsh_attention(qk, v, rot, causal=True, chunk_size=args.lsh_chunk))
        lines.append(f"lsh-{R} vs dense masked reference (same buckets): rel. error {err:.1e}")
        ok &= err < 1e-10
    if not ok:
        raise SystemExit("verification failed:\n  " + "\n  ".join(lines))
    return lines


def measure(method: str, N: int, args) -> dict:
    B = max(1, args.tokens // N)
    H, D = args.heads, args.dim
    inputs = [x.requires_grad_(True) for x in _inputs(method, B, N, H, D, seed=N)]
    fn = _function(method, N, args.lsh_chunk)
    grad = torch.randn_like(inputs[-1])

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), inputs, grad)

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    # one untimed run (warm-up), then time; the long points run once, measuring time and memory together
    t0 = time.perf_counter()
    mem = peak_extra_memory(fwd_bwd, torch.device("cpu"))
    first = time.perf_counter() - t0
    repeats = 1 if first > 5 or args.quick else 3
    times = [first] if repeats == 1 else []
    while len(times) < repeats:
        t0 = time.perf_counter()
        fwd_bwd()
        times.append(time.perf_counter() - t0)
    fwd_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd()
        fwd_times.append(time.perf_counter() - t0)
    return {
        "method": method,
        "N": N,
        "batch": B,
        "heads": H,
        "dim": D,
        "fwdbwd_ms_per_sample": 1e3 * min(times) / B,
        "fwd_ms_per_sample": 1e3 * min(fwd_times) / B,
        "peak_mib_per_sample": mem / 2**20 / B,
        "repeats": repeats,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.3))
    for method in METHODS:
        pts = sorted((r["N"], r) for r in rows if r["method"] == method and "fwdbwd_ms_per_sample" in r)
        if not pts:
            continue
        Ns = [n for n, _ in pts]
        ax_t.plot(Ns, [r["fwdbwd_ms_per_sample"] / 1e3 for _, r in pts], "o-", color=COLORS[method], label=method)
        ax_m.plot(Ns, [r["peak_mib_per_sample"] for _, r in pts], "o-", color=COLORS[method], label=method)
    labels = [(ax_t, "forward + backward time per sample (s)"), (ax_m, "peak extra memory per sample (MiB)")]
    finish_log_log(fig, labels, title, path)


def summary(rows: list[dict]) -> str:
    Ns = sorted({r["N"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    by = {(r["method"], r["N"]): r for r in rows}

    def cell(m, n, key, digits):
        r = by.get((m, n))
        if r is None:
            return ""
        return fmt(r[key], digits) if key in r else "skipped"

    time_table = markdown_table(
        ["N", *methods], [[str(n)] + [cell(m, n, "fwdbwd_ms_per_sample", 2) for m in methods] for n in Ns]
    )
    mem_table = markdown_table(
        ["N", *methods], [[str(n)] + [cell(m, n, "peak_mib_per_sample", 1) for m in methods] for n in Ns]
    )
    out = "Forward + backward, ms per sample:\n\n" + time_table + "\nPeak extra memory, MiB per sample:\n\n" + mem_table
    lin = {r["N"]: r["fwdbwd_ms_per_sample"] for r in rows if r["method"] == "linear" and "fwdbwd_ms_per_sample" in r}
    if 2**12 in lin and 2**16 in lin:
        ratio = lin[2**16] / lin[2**12]
        out += (
            f"\nlinear: time(2^16) / time(2^12) per sample = {ratio:.1f}x (16x is exactly linear; "
            f"{'within' if ratio <= 20 else 'OVER'} the 20x bound)\n"
        )
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        out += "\nSkipped: " + "; ".join(f"{r['method']} N={r['N']} ({r['skipped']})" for r in skipped) + "\n"
    return out


def write_results(out: Path, rows: list[dict], info: dict, threads: int, config: str) -> str:
    write_csv(out / "figure1.csv", rows)
    table = summary(rows)
    (out / "table.md").write_text(
        f"Figure 1 on {info['cpu']}, {threads} threads, torch {info['torch']}; {config}\n\n" + table
    )
    return table


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.fig_lengths, args.heads, args.dim, args.tokens, args.lsh_chunk = [128, 256], 2, 16, 512, 16
    started = provenance(getattr(args, "command_line", None))  # (run.json: what made the results)
    torch.set_num_threads(args.threads)
    info = machine_info()
    config = f"H={args.heads} D={args.dim} float32, {args.tokens} tokens per batch, LSH chunk {args.lsh_chunk}"
    print(f"machine: {info['cpu']}, {info['cores']} cores, {args.threads} threads, torch {info['torch']}")
    print(f"config:  {config}")
    print("verifying ...", flush=True)
    for line in verify(args):
        print("  " + line)
    rows, last = [], {}
    for N in args.fig_lengths:
        for method in args.fig_methods:
            B = max(1, args.tokens // N)
            need = peak_bytes(method, B, N, args.heads, args.dim, args.lsh_chunk)
            row = {"method": method, "N": N, "batch": B}
            if need > args.memory_gib * 2**30:
                row["skipped"] = f"would need ~{need / 2**30:.0f} GiB"
            elif method in last:
                n0, t0 = last[method]
                growth = (N / n0) ** (2 if method.startswith("softmax") else 1)  # per sequence of the batch
                predicted = t0 * growth * B
                if predicted > args.max_seconds:
                    row["skipped"] = f"predicted {predicted:.0f} s > --max-seconds"
            if "skipped" not in row:
                row = measure(method, N, args)
                last[method] = (N, row["fwdbwd_ms_per_sample"] / 1e3)
                print(
                    f"  N={N:>6} {method:>12}: batch {B:4d}  fwd+bwd {row['fwdbwd_ms_per_sample']:10.2f} ms/sample"
                    f"  fwd {row['fwd_ms_per_sample']:9.2f} ms/sample"
                    f"  peak {row['peak_mib_per_sample']:9.1f} MiB/sample",
                    flush=True,
                )
            else:
                print(f"  N={N:>6} {method:>12}: skipped ({row['skipped']})", flush=True)
            rows.append(row)
            table = write_results(args.out, rows, info, args.threads, config)  # after every point: a crash keeps them
    out = args.out
    plot(rows, out / "figure1.png", f"one causal attention layer, {config}\n{info['cpu']}, {args.threads} threads")
    print()
    print(table)
    write_run_record(out, started, config=config, threads=args.threads, max_seconds=args.max_seconds)
    print(f"wrote {out / 'figure1.csv'}, {out / 'figure1.png'}, {out / 'table.md'}, {out / 'run.json'}")
    return 0
