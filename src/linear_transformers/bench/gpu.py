"""GPU: the Triton kernels against the PyTorch chunked path and causal SDPA (FlashAttention for half
precision), and flash-linear-attention's chunk_linear_attn or pytorch-fast-transformers'
CausalLinearAttention when importable.

First verified (Triton against the float32 PyTorch path: outputs and gradients), then forward and
forward+backward are timed (triton.testing.do_bench, median) over sequence lengths, head widths and
dtypes, plus the latency of one decode step of one layer at batch 1, and the achieved TFLOP/s
(the chunked algorithm's FLOP count) against the card's measured matmul rate. Writes gpu.csv and
table.md under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import LinearState
from .attention import chunked_flops
from .measure import machine_info
from .report import fmt, markdown_table, write_csv

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("results/bench_gpu"))


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _inputs(B, N, H, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (F.elu(torch.randn(B, N, H, D, device="cuda", generator=g)) + 1).to(dtype).requires_grad_()
    k = (F.elu(torch.randn(B, N, H, D, device="cuda", generator=g)) + 1).to(dtype).requires_grad_()
    v = torch.randn(B, N, H, D, device="cuda", generator=g).to(dtype).requires_grad_()
    return q, k, v


def _implementations(q, k, v):
    """name -> forward function taking nothing and returning the [B, N, H, D] (or head-major) output."""
    impls = {
        "triton": lambda: ops.causal_linear_attention(q, k, v, backend="triton"),
        "chunked": lambda: ops.causal_linear_attention(q, k, v, backend="chunked"),
    }
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    impls["sdpa"] = lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    impls["sdpa"].inputs = (qh, kh, vh)
    if importlib.util.find_spec("fla") is not None:
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            impls["fla"] = lambda: chunk_linear_attn(q, k, v, normalize=True)[0]
        except ImportError:
            pass
    return impls


def verify(dtype_names: list[str]) -> list[str]:
    lines = []
    q, k, v = _inputs(2, 1000, 4, 64, torch.float32, seed=1)
    outs = {}
    for backend in ("chunked", "triton"):
        out = ops.causal_linear_attention(q, k, v, backend=backend)
        outs[backend] = [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]
    err = max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs["triton"], outs["chunked"], strict=True)
    )
    lines.append(f"triton vs PyTorch chunked, float32, outputs and dq/dk/dv: rel. error {err:.1e}")
    if not err < 1e-4:
        raise SystemExit(f"verification failed: triton differs from the PyTorch path: {err:.2e}")
    for name in dtype_names:
        if DTYPES[name] == torch.float32:
            continue
        qd, kd, vd = (x.detach().to(DTYPES[name]) for x in (q, k, v))
        got = ops.causal_linear_attention(qd, kd, vd, backend="triton").float()
        err = ((got - outs["chunked"][0]).abs().max() / outs["chunked"][0].abs().max()).item()
        lines.append(f"triton {name} vs float32: rel. error {err:.1e}")
        if not err < 5e-2:
            raise SystemExit(f"verification failed: triton {name} output error {err:.2e}")
    return lines


def capture_step(q, k, v, S, z, out, eps: float = 1e-6) -> torch.cuda.CUDAGraph:
    """The Triton step captured in a CUDA graph: replay() reads q, k, v and updates S, z and out in
    place (the kernel allocates nothing, so it can be captured). Warmed up on a side stream first."""
    from ..ops import triton as triton_backend

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    S0, z0 = S.clone(), z.clone()
    with torch.cuda.stream(side):  # compiles the kernel outside the capture
        triton_backend.step(q, k, v, S, z, eps, out=out)
    torch.cuda.current_stream().wait_stream(side)
    S.copy_(S0)
    z.copy_(z0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_backend.step(q, k, v, S, z, eps, out=out)
    return graph


def decode_latency_us(H: int, D: int) -> dict[str, float]:
    """One decode step of one layer's attention (batch 1): Triton kernel (launched, and replayed
    from a CUDA graph) vs the PyTorch step."""
    q, k, v = (torch.rand(1, H, D, device="cuda") for _ in range(3))
    state = LinearState.zeros(1, H, D, D, device="cuda")
    out = torch.empty(1, H, D, device="cuda")
    from ..ops import triton as triton_backend
    from ..ops.step import step_pytorch

    res = {"triton": _bench(lambda: triton_backend.step(q, k, v, state.S, state.z, 1e-6, out=out)) * 1e3}
    graph = capture_step(q, k, v, state.S, state.z, out)
    res["triton-graph"] = _bench(graph.replay) * 1e3

    def pytorch_step():
        with torch.no_grad():
            step_pytorch(q, k, v, state, 1e-6)

    res["pytorch"] = _bench(pytorch_step) * 1e3
    return res


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device")
    info = machine_info()
    print(f"device: {info.get('gpu')}, torch {info['torch']}")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16_tflops = 2 * 8192**3 / _bench(lambda: a @ a) / 1e9
    a32 = a.float()
    f32_tflops = 2 * 8192**3 / _bench(lambda: a32 @ a32) / 1e9
    print(f"matmul 8192^3: bfloat16 {bf16_tflops:.0f} TFLOP/s, float32 {f32_tflops:.0f} TFLOP/s")
    for line in verify(args.dtypes):
        print("  verified: " + line)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for D in args.dims:
            for N in args.lengths:
                q, k, v = _inputs(args.batch, N, args.heads, D, dtype)
                g = torch.randn(args.batch, N, args.heads, D, device="cuda", dtype=dtype)
                for impl, fn in _implementations(q, k, v).items():
                    inputs = getattr(fn, "inputs", (q, k, v))
                    grad = g.transpose(1, 2).contiguous() if impl == "sdpa" else g

                    def fwd(fn=fn):
                        with torch.no_grad():
                            fn()

                    def fwd_bwd(fn=fn, inputs=inputs, grad=grad):
                        torch.autograd.grad(fn(), inputs, grad)

                    row = {"dtype": name, "D": D, "N": N, "impl": impl}
                    try:
                        row["fwd_ms"], row["fwdbwd_ms"] = _bench(fwd), _bench(fwd_bwd)
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        torch.cuda.empty_cache()
                        rows.append(row)
                        continue
                    if impl in ("triton", "chunked", "fla"):
                        flops = chunked_flops(N, args.batch, args.heads, D, D, 64, True)
                        row["fwdbwd_tflops"] = flops / (row["fwdbwd_ms"] * 1e-3) / 1e12
                    rows.append(row)
                    print(f"  {name:8s} D={D:3d} N={N:6d} {impl:8s} fwd {row['fwd_ms']:8.3f} ms  "
                          f"fwd+bwd {row['fwdbwd_ms']:8.3f} ms", flush=True)  # fmt: skip
                del q, k, v, g
    decode = decode_latency_us(args.heads, 64)
    decode_text = (
        f"triton {decode['triton']:.1f} us, triton in a CUDA graph {decode['triton-graph']:.1f} us, "
        f"PyTorch {decode['pytorch']:.1f} us"
    )
    print(f"decode step, one layer (B=1, H={args.heads}, D=64): {decode_text}")
    rows += [{"impl": f"decode-step-{name}", "us": us} for name, us in decode.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "gpu.csv", rows)
    table = summary(rows)
    header = (
        f"GPU: {info.get('gpu')}, torch {info['torch']}, B={args.batch}, H={args.heads}; median of "
        f"triton.testing.do_bench. Matmul: bf16 {bf16_tflops:.0f}, fp32 {f32_tflops:.0f} TFLOP/s.\n"
        f"Decode step, one layer, batch 1: {decode_text}.\n\n"
    )
    (args.out / "table.md").write_text(header + table)
    print()
    print(table)
    print(f"wrote {args.out / 'gpu.csv'}, {args.out / 'table.md'}")
    return 0


def summary(rows: list[dict]) -> str:
    by = {(r["dtype"], r["D"], r["N"], r["impl"]): r for r in rows if "dtype" in r}
    out = []
    for (dtype, D, N, impl), r in by.items():
        if impl != "triton":
            continue
        c, s, f = by.get((dtype, D, N, "chunked"), {}), by.get((dtype, D, N, "sdpa"), {}), by.get((dtype, D, N, "fla"))

        def ratio(other, key, r=r):
            return fmt(other[key] / r[key], 1) + "x" if key in other and key in r else "-"

        out.append([dtype, str(D), str(N), fmt(r.get("fwd_ms"), 3), fmt(r.get("fwdbwd_ms"), 3),
                    fmt(r.get("fwdbwd_tflops"), 1), ratio(c, "fwdbwd_ms"), ratio(s, "fwd_ms"), ratio(s, "fwdbwd_ms"),
                    ratio(f, "fwdbwd_ms") if f else "-"])  # fmt: skip
    return markdown_table(
        ["dtype", "D", "N", "triton fwd ms", "triton fwd+bwd ms", "TFLOP/s", "vs chunked (fwd+bwd)",
         "vs SDPA fwd", "vs SDPA fwd+bwd", "vs fla"], out)  # fmt: skip
