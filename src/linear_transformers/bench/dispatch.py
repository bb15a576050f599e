"""What the eager path saves: causal linear attention through the registered operators against the
same backend called directly (library.EagerCausalLinearAttention), forward + backward.

    linear-transformers bench dispatch                 # the CPU kernel and "chunked", five shapes

Outside torch.compile, `causal_linear_attention` skips the custom-operator dispatch and its autograd
wrapper; this program measures whether that second path is worth keeping. First both paths must
give the same outputs, final states and gradients, bit for bit; then they take turns, best of
--repeats rounds of enough calls to last a few milliseconds, at shapes from a decoding-sized
prompt to a training batch. Writes dispatch.csv and table.md under --out.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, write_csv

# (B, T, H, D): a short prompt, the MNIST experiment's layer (d_model 64, 4 heads), training batches
SHAPES = [(1, 64, 8, 64), (16, 196, 4, 16), (8, 256, 8, 64), (1, 1024, 8, 64), (4, 1024, 8, 64)]


@dataclass
class DispatchOptions:
    backends: list[str] = option(["cpu", "chunked"], "backends to time", choices=["cpu", "chunked"])
    repeats: int = count(7, "rounds, the two paths taking turns; the best counts")
    threads: int = option(torch.get_num_threads(), "CPU threads")
    quick: bool = option(False, "the two smallest shapes, 2 rounds (seconds: a smoke test)")
    out: Path = option(Path("results/bench-dispatch"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, DispatchOptions, title="benchmark")


def _inputs(B: int, T: int, H: int, D: int):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(B, T, H, D, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, D, generator=g).requires_grad_()
    S0, z0 = torch.zeros(B, H, D, D).requires_grad_(), torch.zeros(B, H, D).requires_grad_()
    return q, k, v, S0, z0


def _path(name: str, backend: str, inputs):
    from ..ops import library

    def run():
        if name == "operators":
            op = torch.ops.linear_transformers.causal_linear_attention_fwd
            y, S, z, *_ = op(*inputs, 1e-6, 64, backend, True)
        else:
            y, S, z = library.EagerCausalLinearAttention.apply(*inputs, 1e-6, 64, backend)
        loss = y.square().sum() + S.sum() + z.sum()
        return [y, S, z, *torch.autograd.grad(loss, inputs)]

    return run


def verify(backend: str) -> None:
    inputs = _inputs(2, 70, 2, 8)
    a, b = _path("operators", backend, inputs)(), _path("eager", backend, inputs)()
    if not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
        raise SystemExit(f"verification failed: backend {backend}: the eager path differs from the operators")


def main(args: argparse.Namespace) -> int:
    from ..ops import cpu

    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends if b != "cpu" or cpu.available()]
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    for line in isa_lines():
        print(line)
    shapes, repeats = (SHAPES[:2], 2) if args.quick else (SHAPES, args.repeats)
    rows = []
    for backend in backends:
        verify(backend)
        print(f"verified: backend {backend}, the eager path equals the operators bit for bit")
        for B, T, H, D in shapes:
            inputs = _inputs(B, T, H, D)
            paths = {name: _path(name, backend, inputs) for name in ("operators", "eager")}
            calls = max(3, int(2e6 // (B * T * H * D)))
            best = dict.fromkeys(paths, float("inf"))
            for fn in paths.values():
                fn()
            for _ in range(repeats):
                for name, fn in paths.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - t0) / calls)
            row = {
                "backend": backend,
                "B": B,
                "T": T,
                "H": H,
                "D": D,
                "operators_us": best["operators"] * 1e6,
                "eager_us": best["eager"] * 1e6,
            }
            row["ratio"] = row["operators_us"] / row["eager_us"]
            rows.append(row)
            print(
                f"  {backend:8s} B={B:2d} T={T:4d} H={H} D={D:2d}: operators {row['operators_us']:9.1f} us, "
                f"eager {row['eager_us']:9.1f} us, operators / eager {row['ratio']:.3f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "dispatch.csv", rows)
    table = markdown_table(
        ["backend", "B, T, H, D", "operators: us", "eager: us", "saved: us", "operators / eager"],
        [
            [
                r["backend"],
                f"{r['B']}, {r['T']}, {r['H']}, {r['D']}",
                fmt(r["operators_us"], 1),
                fmt(r["eager_us"], 1),
                fmt(r["operators_us"] - r["eager_us"], 1),
                f"{r['ratio']:.3f}x",
            ]
            for r in rows
        ],
    )
    header = (
        f"Forward+backward, operators vs eager path, {info['cpu']}, {args.threads} threads, torch {info['torch']}\n"
    )
    (args.out / "table.md").write_text(header + "".join(line + "\n" for line in isa_lines()) + "\n" + table + "\n")
    print(table)
    print(f"wrote {args.out}/dispatch.csv and table.md")
    return 0
