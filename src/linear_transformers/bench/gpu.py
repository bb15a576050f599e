"""GPU: the Triton kernels against the PyTorch chunked path, causal SDPA (FlashAttention for half
precision), flash-linear-attention's chunk_linear_attn (normalised) when importable, and
pytorch-fast-transformers' CUDA causal product when importable or built from its source
(--fast-transformers-src: only that one kernel is compiled, with torch's extension builder).

First verified (every implementation against a float64 reference: outputs and gradients, and each
Triton dot precision), then forward and forward+backward are timed (triton.testing.do_bench,
median) over sequence lengths, head widths and dtypes, then the kernels' share of one Triton
forward+backward (torch.profiler), the latency of one decode step of one layer at batch 1, and the
achieved TFLOP/s (the chunked algorithm's FLOP count) against the card's measured matmul rate.
Writes gpu.csv, table.md and gpu.png under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import LinearState
from ..ops import triton as triton_backend
from ..options import add_options, count, option
from ..results import finish_log_log, fmt, machine_info, markdown_table, write_csv
from .attention import chunked_flops

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# "triton" is the default dot precision for the dtype (ops.triton.dot_precision); the others force one
TRITON_VARIANTS = {f"triton-{p}": p for p in triton_backend.PRECISIONS}
IMPLS = ["triton", *TRITON_VARIANTS, "chunked", "sdpa", "fla", "fast-transformers"]
DEFAULT_IMPLS = ["triton", "chunked", "sdpa", "fla", "fast-transformers"]


@dataclass
class GpuOptions:
    lengths: list[int] = count([1024, 4096, 16384, 65536], "sequence lengths")
    dims: list[int] = count([64, 128], "head dimensions (Dk = Dv)")
    dtypes: list[str] = option(["bfloat16", "float32"], "input dtypes", choices=list(DTYPES))
    impls: list[str] = option(
        DEFAULT_IMPLS, "what to time; fla and fast-transformers only where importable (or built)", choices=IMPLS
    )
    chunked_max_length: int = count(65536, "time the PyTorch chunked path only up to this length (it is the slow one)")
    fast_transformers_src: Path | None = option(
        None, "an unpacked pytorch-fast-transformers source: build its CUDA causal product"
    )
    batch: int = count(1, "sequences per call")
    heads: int = count(8, "attention heads")
    out: Path = option(Path("results/bench_gpu"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, GpuOptions, title="benchmark")


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _inputs(B, N, H, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (F.elu(torch.randn(B, N, H, D, device="cuda", generator=g)) + 1).to(dtype).requires_grad_()
    k = (F.elu(torch.randn(B, N, H, D, device="cuda", generator=g)) + 1).to(dtype).requires_grad_()
    v = torch.randn(B, N, H, D, device="cuda", generator=g).to(dtype).requires_grad_()
    return q, k, v


def fast_transformers_kernel(src: Path | None):
    """pytorch-fast-transformers' CUDA causal product (its `causal_dot_product` and
    `causal_dot_backward`), from the installed package or compiled from `src`; None if neither."""
    try:
        from fast_transformers.causal_product import causal_product_cuda

        return causal_product_cuda
    except ImportError:
        pass
    if src is None:
        return None
    cu = Path(src) / "fast_transformers" / "causal_product" / "causal_product_cuda.cu"
    if not cu.is_file():
        raise SystemExit(f"--fast-transformers-src: no {cu}")
    from torch.utils.cpp_extension import load

    try:
        return load(name="fast_transformers_causal_product_cuda", sources=[str(cu)], extra_cuda_cflags=["-O3"])
    except (RuntimeError, OSError) as e:  # a failed build is reported and the column left empty
        print(f"pytorch-fast-transformers: building {cu} failed: {e}")
        return None


def _fast_transformers_attention(kernel):
    """CausalLinearAttention of pytorch-fast-transformers on feature-mapped q, k ([B, N, H, D],
    float32): its CUDA causal product and its normaliser, 1 / (q . cumsum(k) + eps)."""

    class CausalDotProduct(torch.autograd.Function):  # the package's own autograd wrapper, as written there
        @staticmethod
        def forward(ctx, Q, K, V):
            ctx.save_for_backward(Q, K, V)
            product = torch.zeros(*Q.shape[:3], V.shape[-1], device=Q.device)
            kernel.causal_dot_product(Q, K, V, product)
            return product

        @staticmethod
        def backward(ctx, grad_out):
            Q, K, V = ctx.saved_tensors
            grads = [torch.zeros_like(x) for x in (Q, K, V)]
            kernel.causal_dot_backward(Q, K, V, grad_out.contiguous(), *grads)
            return tuple(grads)

    def attend(q, k, v, eps=1e-6):
        Z = 1 / (torch.einsum("nlhi,nlhi->nlh", q, k.cumsum(1)) + eps)
        heads = [x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v)]
        return CausalDotProduct.apply(*heads).permute(0, 2, 1, 3) * Z[..., None]

    return attend


def _fla():
    if importlib.util.find_spec("fla") is None:
        return None
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None
    return lambda q, k, v: chunk_linear_attn(q, k, v, scale=1.0, normalize=True)[0]


def _implementations(q, k, v, wanted: list[str], ft_kernel, chunked_max_length: int | None = None) -> dict:
    """name -> forward function taking nothing and returning the [B, N, H, D] (or head-major) output;
    those that cannot run here (not importable, another dtype, longer than chunked_max_length) left out.
    flash-linear-attention is timed in half precision only: its float32 autotuning alone ran past
    four minutes on an H200."""
    impls = {}
    for name in wanted:
        if name == "triton" or name in TRITON_VARIANTS:
            impls[name] = _triton_impl(q, k, v, TRITON_VARIANTS.get(name))
        elif name == "chunked" and (chunked_max_length is None or q.shape[1] <= chunked_max_length):
            impls[name] = lambda: ops.causal_linear_attention(q, k, v, backend="chunked")
        elif name == "sdpa":
            impls[name] = _sdpa_impl(q, k, v)
        elif name == "fla" and q.dtype != torch.float32 and (fla := _fla()) is not None:
            impls[name] = functools.partial(fla, q, k, v)
        elif name == "fast-transformers" and ft_kernel is not None and q.dtype == torch.float32:
            impls[name] = functools.partial(_fast_transformers_attention(ft_kernel), q, k, v)
    return impls


def _triton_impl(q, k, v, precision: str | None):
    """The Triton backend at its default dot precision (None) or at `precision`."""

    def run():
        with triton_backend.precision(precision) if precision else contextlib.nullcontext():
            return ops.causal_linear_attention(q, k, v, backend="triton")

    return run


def _sdpa_impl(q, k, v):
    """Causal softmax SDPA on head-major copies (its `inputs`, for the gradients)."""
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def run():
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

    run.inputs = (qh, kh, vh)
    return run


def _outputs_and_grads(fn, inputs):
    out = fn()
    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(out.shape, device="cuda", generator=g).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, inputs, w)]


def verify(dtype_names: list[str], impls: list[str], ft_kernel) -> list[dict]:
    """Every implementation (SDPA excepted: it is softmax) against float64 PyTorch, B=2, N=1000,
    H=4, D=64: max abs error of the output and of dq, dk, dv, each over the reference's max abs.
    Exits when the Triton kernels at their default precision are off (float32: 1e-4; half: 5e-2)."""
    rows = []
    base = _inputs(2, 1000, 4, 64, torch.float64, seed=1)
    ref = _outputs_and_grads(lambda: ops.causal_linear_attention(*base, backend="chunked"), base)
    for name in dtype_names:
        q, k, v = (x.detach().to(DTYPES[name]).requires_grad_() for x in base)
        for impl, fn in _implementations(q, k, v, [i for i in impls if i != "sdpa"], ft_kernel).items():
            got = _outputs_and_grads(fn, (q, k, v))
            errs = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True)]
            rows.append({"dtype": name, "impl": impl, "out_err": errs[0], "grad_err": max(errs[1:])})
            print(f"  verified: {impl:18s} {name:8s} rel. error: output {errs[0]:.1e}, gradients {max(errs[1:]):.1e}")
            limit = 1e-4 if DTYPES[name] == torch.float32 else 5e-2
            if impl == "triton" and not max(errs) < limit:
                raise SystemExit(f"verification failed: triton {name} differs from float64 by {max(errs):.2e}")
    return rows


def kernel_share(B, N, H, D, dtype) -> tuple[float, float]:
    """(milliseconds of GPU kernels, milliseconds measured by do_bench) of one Triton forward+backward:
    what is left over is launch and Python overhead."""
    q, k, v = _inputs(B, N, H, D, dtype)
    g = torch.randn_like(q)

    def fwd_bwd():
        torch.autograd.grad(ops.causal_linear_attention(q, k, v, backend="triton"), (q, k, v), g)

    wall = _bench(fwd_bwd)
    reps = 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fwd_bwd()
        torch.cuda.synchronize()
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages())
    return kernels_us / reps / 1e3, wall


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
    ft_kernel = fast_transformers_kernel(args.fast_transformers_src) if "fast-transformers" in args.impls else None
    found = {"fla": _fla(), "fast-transformers": ft_kernel}
    missing = [name for name, ok in found.items() if name in args.impls and ok is None]
    if missing:
        print(f"not importable here, left out: {', '.join(missing)}")
    rates = _matmul_rates()
    print(f"matmul 8192^3: {rates}")
    errors = verify(args.dtypes, args.impls, ft_kernel)
    share = {}
    for name in args.dtypes:
        N = 4096 if 4096 in args.lengths else args.lengths[0]
        kernels_ms, wall_ms = kernel_share(args.batch, N, args.heads, args.dims[0], DTYPES[name])
        share[name] = (N, kernels_ms, wall_ms)
        print(f"triton {name} N={N} D={args.dims[0]} fwd+bwd: kernels {kernels_ms:.3f} ms of {wall_ms:.3f} ms")
    decode = decode_latency_us(args.heads, 64)
    decode_text = (
        f"triton {decode['triton']:.1f} us, triton in a CUDA graph {decode['triton-graph']:.1f} us, "
        f"PyTorch {decode['pytorch']:.1f} us"
    )
    print(f"decode step, one layer (B=1, H={args.heads}, D=64): {decode_text}")
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [{"impl": f"decode-step-{name}", "us": us} for name, us in decode.items()]
    extra += [{"impl": "verify", **e} for e in errors]
    for name in args.dtypes:
        dtype = DTYPES[name]
        for D in args.dims:
            for N in args.lengths:
                q, k, v = _inputs(args.batch, N, args.heads, D, dtype)
                g = torch.randn(args.batch, N, args.heads, D, device="cuda", dtype=dtype)
                impls = _implementations(q, k, v, args.impls, ft_kernel, args.chunked_max_length)
                for impl, fn in impls.items():
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
                        write_csv(args.out / "gpu.csv", rows + extra)
                        continue
                    if impl != "sdpa":
                        flops = chunked_flops(N, args.batch, args.heads, D, D, 64, True)
                        row["fwdbwd_tflops"] = flops / (row["fwdbwd_ms"] * 1e-3) / 1e12
                    rows.append(row)
                    write_csv(args.out / "gpu.csv", rows + extra)  # kept if the run is stopped
                    print(
                        f"  {name:8s} D={D:3d} N={N:6d} {impl:18s} fwd {row['fwd_ms']:8.3f} ms  "
                        f"fwd+bwd {row['fwdbwd_ms']:8.3f} ms",
                        flush=True,
                    )
                del q, k, v, g
    plot(rows, args.out / "gpu.png", f"{info.get('gpu')}, B={args.batch}, H={args.heads}: forward+backward")
    share_text = "; ".join(f"{n} N={N}: {k:.3f} of {w:.3f} ms" for n, (N, k, w) in share.items())
    table = summary(rows) + "\n" + times_table(rows)
    header = (
        f"GPU: {info.get('gpu')}, torch {info['torch']}, B={args.batch}, H={args.heads}; median of "
        f"triton.testing.do_bench. Matmul: {rates}.\n"
        f"Decode step, one layer, batch 1: {decode_text}.\n"
        f"Kernels' share of a Triton forward+backward (D={args.dims[0]}): {share_text}.\n\n"
    )
    (args.out / "table.md").write_text(header + table)
    print()
    print(table)
    print(f"wrote {args.out / 'gpu.csv'}, {args.out / 'table.md'}, {args.out / 'gpu.png'}")
    return 0


def _matmul_rates() -> str:
    """The card's measured 8192^3 matmul rates: bfloat16, TF32 and float32."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * 8192**3 / _bench(lambda: a @ a) / 1e9
    a = a.float()
    with _matmul_precision("high"):
        tf32 = 2 * 8192**3 / _bench(lambda: a @ a) / 1e9
    with _matmul_precision("highest"):
        f32 = 2 * 8192**3 / _bench(lambda: a @ a) / 1e9
    return f"bfloat16 {bf16:.0f}, TF32 {tf32:.0f}, float32 {f32:.0f} TFLOP/s"


@contextlib.contextmanager
def _matmul_precision(name: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(name)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def summary(rows: list[dict]) -> str:
    """The default Triton path per (dtype, D, N), and every other implementation's time over it."""
    by = {(r["dtype"], r["D"], r["N"], r["impl"]): r for r in rows if "fwdbwd_ms" in r}
    others = ["chunked", "sdpa", "fla", "fast-transformers"]
    out = []
    for (dtype, D, N, impl), r in by.items():
        if impl != "triton":
            continue

        def ratio(other, key, r=r, dtype=dtype, D=D, N=N):
            o = by.get((dtype, D, N, other))
            return fmt(o[key] / r[key], 1) + "x" if o else "-"

        out.append(
            [
                dtype,
                str(D),
                str(N),
                fmt(r["fwd_ms"], 3),
                fmt(r["fwdbwd_ms"], 3),
                fmt(r["fwdbwd_tflops"], 1),
                ratio("sdpa", "fwd_ms"),
                *(ratio(o, "fwdbwd_ms") for o in others),
            ]
        )
    return markdown_table(
        [
            "dtype",
            "D",
            "N",
            "triton fwd ms",
            "triton fwd+bwd ms",
            "TFLOP/s",
            "vs SDPA fwd",
            *(f"vs {o} (fwd+bwd)" for o in others),
        ],
        out,
    )


def times_table(rows: list[dict]) -> str:
    """Forward+backward milliseconds of every implementation timed, one column each."""
    impls = list(dict.fromkeys(r["impl"] for r in rows if "fwdbwd_ms" in r))
    cells = {}
    for r in rows:
        if "fwdbwd_ms" in r:
            cells.setdefault((r["dtype"], r["D"], r["N"]), {})[r["impl"]] = r["fwdbwd_ms"]
    out = [[dtype, str(D), str(N), *(fmt(c.get(i), 3) for i in impls)] for (dtype, D, N), c in cells.items()]
    return markdown_table(["dtype", "D", "N", *(f"{i} fwd+bwd ms" for i in impls)], out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Forward+backward time against N, one panel per (dtype, D), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dtype"], r["D"]) for r in rows if "fwdbwd_ms" in r))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (dtype, D) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if (r["dtype"], r["D"]) == (dtype, D) and "fwdbwd_ms" in r]
        for impl in dict.fromkeys(r["impl"] for r in mine):
            pts = sorted((r["N"], r["fwdbwd_ms"]) for r in mine if r["impl"] == impl)
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set_title(f"{dtype}, D={D}", fontsize=9)
    finish_log_log(fig, [(ax, "forward+backward ms") for ax in axes[0]], title, path)
