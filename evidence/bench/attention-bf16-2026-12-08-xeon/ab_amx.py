"""The attention kernel's bfloat16 path with its forward's chunk products on AMX-BF16 tiles (level
x86-64-v4-amx) against the same code on AVX512-BF16 vector tiles (level x86-64-v4-bf16), both
built here and taking turns in one process (each call swaps the library the CPU backend loads), and
the float32 kernel (AMX level) for scale: forward and forward+backward, B=1 H=8 D=64, chunk 64, 2
threads; medians and mins of 10 rounds. Verified first: both bfloat16 builds against float64 on the
same inputs (outputs and gradients). Behind BENCHMARKS.md's "bfloat16 on AMX tiles". Run from the
repository root on a CPU with AMX:
    THP_MEM_ALLOC_ENABLE=1 PYTHONPATH=src python evidence/bench/attention-bf16-2026-12-08-xeon/ab_amx.py > ab_amx.txt
"""

import statistics
import time

import torch

from linear_transformers import native, ops
from linear_transformers.ops import cpu
from linear_transformers.results import machine_info

torch.set_num_threads(2)
LEVELS = ("x86-64-v4-amx", "x86-64-v4-bf16")
libs = {}
for level in LEVELS:
    with native.use(level, "cc"):
        assert cpu.available(), cpu.unavailable_reason()
        libs[level] = cpu.load()
original = cpu.load


def run(level, q, k, v, backward):
    cpu.load = lambda lib=libs[level]: lib
    try:
        y = ops.causal_linear_attention(q, k, v, backend="cpu", chunk_size=64)
        if backward:
            (dq, dk, dv) = torch.autograd.grad(y.float().square().sum(), (q, k, v))
            return y, dq, dk, dv
        return (y,)
    finally:
        cpu.load = original


print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; THP_MEM_ALLOC_ENABLE as set")
print("N,variant,fwd_median_ms,fwd_min_ms,fwdbwd_median_ms,fwdbwd_min_ms")
g = torch.Generator().manual_seed(0)
for N in (2048, 8192, 16384):
    base = [torch.randn(1, N, 8, 64, generator=g).softmax(-1) for _ in range(3)]
    bf = [x.bfloat16().requires_grad_() for x in base]
    f32 = [x.float().requires_grad_() for x in base]
    exact = [x.double().requires_grad_() for x in bf]
    if N <= 2048:  # verified: each bfloat16 build against float64 on the same rounded inputs
        y = ops.causal_linear_attention(*exact, backend="chunked", chunk_size=64)
        want = (y, *torch.autograd.grad(y.square().sum(), exact))
        for level in LEVELS:
            got = run(level, *bf, backward=True)
            errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True)]
            print(
                f"# N={N} {level}: relative error of out, dq, dk, dv against float64: "
                + ", ".join(f"{e:.1e}" for e in errs)
            )
            assert max(errs) < 2e-2, (level, errs)
    variants = {
        "bf16 AMX": ("x86-64-v4-amx", bf),
        "bf16 AVX512-BF16": ("x86-64-v4-bf16", bf),
        "f32": ("x86-64-v4-amx", f32),
    }
    times = {(v, b): [] for v in variants for b in (False, True)}
    for _ in range(10):
        for name, (level, inputs) in variants.items():
            for backward in (False, True):
                t0 = time.perf_counter()
                run(level, *inputs, backward=backward)
                times[name, backward].append(time.perf_counter() - t0)
    for name in variants:
        f, fb = times[name, False], times[name, True]
        print(
            f"{N},{name},{1e3 * statistics.median(f):.2f},{1e3 * min(f):.2f},"
            f"{1e3 * statistics.median(fb):.2f},{1e3 * min(fb):.2f}"
        )
