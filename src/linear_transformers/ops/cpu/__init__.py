"""Backend "cpu": the causal linear attention kernel (causal_linear.c, causal_linear_impl.h),
compiled for this CPU's ISA level and loaded with ctypes by `linear_transformers.native` (its
build, cache, `use(level, cc)` and speed verdicts). Threaded on PyTorch's own OpenMP pool where the
compiler has PyTorch's runtime (gcc on Linux), else on pthreads.

"auto" takes the kernel only where it is faster than "chunked" on this machine (`auto_uses_kernel`:
measured once per build on a small representative shape, the verdict kept beside the library).
float32 and float64 run natively. bfloat16 tensors go in and come out as they are, with float32
states and sums; the chunk products use bfloat16 operands (float32 accumulation) where the build
has AVX512-BF16 (x86-64-v4-bf16, x86-64-v4-amx), float32 elsewhere. float16 inputs are computed
in float32 copies.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch

from ... import native
from ...native import ptr as _ptr
from ..records import Forward, Grads, result
from ..validation import accumulation_dtype

LIBRARY = "causal_linear"
NAME = "cpu"


# The arguments of causal_linear.h's functions, by name (a tensor's data pointer, a size, eps, threads)
_SIZES = ("B", "T", "H", "Dk", "Dv", "C")
FORWARD_ARGS = (
    "q",
    "k",
    "v",
    "S0",
    "z0",
    "out",
    "S_final",
    "z_final",
    "S_save",
    "z_save",
    "den_save",
    *_SIZES,
    "eps",
    "n_threads",
)
BACKWARD_ARGS = (
    "q",
    "k",
    "v",
    "out",
    "dout",
    "S_save",
    "z_save",
    "den_save",
    "dS_final",
    "dz_final",
    "dq",
    "dk",
    "dv",
    "dS0",
    "dz0",
    *_SIZES,
    "n_threads",
)


def _ctype(arg: str):
    return (
        ctypes.c_long
        if arg in _SIZES
        else ctypes.c_double
        if arg == "eps"
        else ctypes.c_int
        if arg == "n_threads"
        else ctypes.c_void_p
    )


def _set_signatures(lib: ctypes.CDLL) -> None:
    for suffix in ("f32", "f64", "bf16"):
        for name, args in (("cla_forward", FORWARD_ARGS), ("cla_backward", BACKWARD_ARGS)):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [_ctype(a) for a in args]
            fn.restype = ctypes.c_int


_HERE = Path(__file__).parent
native.register(
    LIBRARY,
    [_HERE / "causal_linear.h", _HERE / "causal_linear.c", _HERE / "causal_linear_impl.h", native.SIMD_H],
    "pytorch",
    _set_signatures,
)


def load() -> ctypes.CDLL | None:
    """The attention kernel library, building it on first call; None if it cannot be built."""
    return native.load(LIBRARY).lib


# Evaluated once while torch.compile traces (the answer does not change within a process).
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the attention kernel (backend "cpu") is built and loaded."""
    return load() is not None


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    return native.load(LIBRARY).error


# The verdict's shape: one training forward+backward at B=1, T=1024, H=8, D=64 (float32), ~5-10 ms.
VERDICT_SHAPE = (1, 1024, 8, 64)


def _measure_attention() -> tuple[float, float]:
    from .. import chunked

    B, T, H, D = VERDICT_SHAPE
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(B, T, H, D, generator=g) + 0.1 for _ in range(2))
    v, dy = (torch.randn(B, T, H, D, generator=g) for _ in range(2))
    S0, z0 = torch.zeros(B, H, D, D), torch.zeros(B, H, D)
    dS, dz = torch.zeros(B, H, D, D), torch.zeros(B, H, D)

    def fwd_bwd(forward, backward):
        def run():
            fwd = forward(q, k, v, S0, z0, 1e-6, 64, True)
            backward(q, k, v, fwd.y, fwd.out_acc, fwd.saved, dy, dS, dz, 1e-6, 64)

        return run

    fns = [fwd_bwd(run_forward, run_backward), fwd_bwd(chunked.run_forward, chunked.run_backward)]
    kernel, pytorch = native.best_of(fns)
    return kernel, pytorch


@torch.compiler.assume_constant_result
def auto_uses_kernel() -> bool:
    """Whether "auto" takes the attention kernel for CPU tensors: it is built and beats "chunked" here."""
    return available() and native.verdict("attention", _measure_attention, LIBRARY)


def _call(name: str, dtype: torch.dtype, *args) -> None:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU kernel is unavailable: {unavailable_reason()}")
    suffix = {torch.float64: "f64", torch.bfloat16: "bf16"}.get(dtype, "f32")
    status = getattr(lib, f"{name}_{suffix}")(*args)
    if status == 2:
        B, T, H, Dk, Dv, C = args[-8:-2] if name == "cla_forward" else args[-7:-1]
        raise ValueError(
            f"causal linear attention CPU kernel ({name}): sizes out of range, got B={B} T={T} H={H} Dk={Dk} Dv={Dv} "
            f"chunk={C} (each >= 1; Dk, Dv and the chunk below 2**29)"
        )
    if status:
        raise MemoryError(f"causal linear attention CPU kernel ({name}): out of memory for its chunk buffers")


class Saved(NamedTuple):
    """What run_forward keeps for the backward."""

    S: torch.Tensor  # [B, H, N, Dk, Dv] the state entering every chunk
    z: torch.Tensor  # [B, H, N, Dk]
    den: torch.Tensor  # [B, H, T] the normaliser of every position


def saved_shapes(B: int, T: int, H: int, Dk: int, Dv: int, C: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of Saved for N = ceil(T / C) chunks."""
    N = -(-T // C)
    return (B, H, N, Dk, Dv), (B, H, N, Dk), (B, H, T)


def _io_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel reads and writes q, k, v and their gradients in: bfloat16 as it is,
    float16 through float32 copies."""
    return torch.bfloat16 if dtype == torch.bfloat16 else accumulation_dtype(dtype)


def run_forward(q, k, v, S0, z0, eps: float, C: int, save: bool) -> Forward:
    """The Forward record (out_acc and Saved empty unless needed)."""
    acc, io = accumulation_dtype(q.dtype), _io_dtype(q.dtype)
    q_, k_, v_ = (x.to(io).contiguous() for x in (q, k, v))
    B, T, H, Dk = q_.shape
    Dv = v_.shape[-1]
    out = torch.empty(B, T, H, Dv, dtype=io)
    S_final = torch.empty(B, H, Dk, Dv, dtype=acc)
    z_final = torch.empty(B, H, Dk, dtype=acc)
    shapes = saved_shapes(B, T, H, Dk, Dv, C)
    S_save, z_save, den = (torch.empty(shape, dtype=acc) if save else None for shape in shapes)
    # (bound to names: a temporary made inside the call's arguments could be freed before the C
    # call reads it, leaving a dangling pointer)
    S0_, z0_ = S0.contiguous(), z0.contiguous()
    _call(
        "cla_forward",
        io,
        *map(_ptr, (q_, k_, v_, S0_, z0_, out, S_final, z_final, S_save, z_save, den)),
        B,
        T,
        H,
        Dk,
        Dv,
        C,
        eps,
        torch.get_num_threads(),
    )
    y = out.to(q.dtype)

    out_acc = out if (save and y is not out) else None
    return result(y, S_final, z_final, out_acc, Saved(S_save, z_save, den) if save else None, like=out)


def run_backward(q, k, v, y, out_acc, saved: Saved, dy, dS_final, dz_final, eps: float, C: int) -> Grads:
    """Gradients of run_forward."""
    S_save, z_save, den = saved
    acc, io = S_save.dtype, _io_dtype(q.dtype)
    q_, k_, v_ = (x.to(io).contiguous() for x in (q, k, v))
    out = (out_acc if out_acc.numel() else y).to(io).contiguous()
    B, T, H, Dk = q_.shape
    Dv = v_.shape[-1]
    dy_ = dy.to(io).contiguous()
    dS_, dz_ = (x.to(acc).contiguous() for x in (dS_final, dz_final))
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    dS0, dz0 = torch.empty(B, H, Dk, Dv, dtype=acc), torch.empty(B, H, Dk, dtype=acc)
    _call(
        "cla_backward",
        io,
        *map(_ptr, (q_, k_, v_, out, dy_, S_save, z_save, den, dS_, dz_, dq, dk, dv, dS0, dz0)),
        B,
        T,
        H,
        Dk,
        Dv,
        C,
        torch.get_num_threads(),
    )
    return Grads(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dS0, dz0)
