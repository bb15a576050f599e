"""Backend "triton": causal linear attention with GPU kernels (kernels.py).

Chunked forward and backward with the normaliser fused and float32 accumulation and states for
every input dtype (float16, bfloat16, float32), any T, Dk and Dv up to 256, initial state in and
final state out with its gradient; and a one-token step that updates the state in place and can
write into a preallocated output (nothing allocated per call: safe to capture in a CUDA graph).

On a machine without a GPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1 was
set before Triton was imported (the tests do this); without Triton the backend is unavailable and
"auto" uses "chunked", with one warning naming the reason.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ..records import Forward, Grads, result

CHUNK = 64  # tokens per chunk: the kernels' tiles are built for it (chunk_size is not a parameter here)

try:
    import triton

    from . import kernels
except ImportError as e:  # Triton is optional
    triton, kernels = None, None
    _IMPORT_ERROR: str | None = f"triton is not importable ({e})"
else:
    _IMPORT_ERROR = None

MAX_DIM = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if kernels is None:
        return _IMPORT_ERROR
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels run on CUDA devices (or in the interpreter with TRITON_INTERPRET=1), not on {device}"
    return None


def available(device: torch.device) -> bool:
    return unavailable_reason(device) is None


def _blocks(DK: int, DV: int) -> tuple[int, int, int]:
    """(BT, BK, BV): chunk length and key/value block widths (powers of two, >= 16 for tl.dot)."""
    BK = min(64, max(16, triton.next_power_of_2(DK)))
    BV = min(64, max(16, triton.next_power_of_2(DV)))
    return CHUNK, BK, BV


# Launch options of the chunk kernels: with 4 warps every one of them spills registers at 64-wide
# tiles (ptxas -v for sm_90: up to 27 KB of spill stores per thread with IEEE dots, ~1 KB with
# TF32); with 8 warps and no software pipelining, at most ~100 bytes.
LAUNCH = dict(num_warps=8, num_stages=1)

PRECISIONS = ("ieee", "tf32", "tf32x3")
_precision_override: str | None = None


def dot_precision(dtype: torch.dtype) -> str:
    """Precision of the kernels' dot products for inputs of `dtype` (sums and states are float32
    whatever it is):

    - bfloat16: "tf32" (tensor cores). The inputs are exact in TF32, so their products are exact;
      only float32 intermediates (the chunk's scores, the states, dout / den) are rounded, to 10
      mantissa bits, well inside the 8 a bfloat16 output keeps.
    - float16: "tf32x3" (three tensor-core passes): TF32 would round the intermediates to the 10
      bits a float16 output keeps, doubling its error.
    - float32: as PyTorch's `torch.get_float32_matmul_precision()` says for matrix products:
      "highest" (PyTorch's default) gives "ieee" (float32 on the CUDA cores); "high" or
      "medium" give "tf32".

    `precision(...)` overrides the choice (the GPU benchmark compares them)."""
    if _precision_override is not None:
        return _precision_override
    if dtype == torch.bfloat16:
        return "tf32"
    if dtype == torch.float16:
        return "tf32x3"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


class precision:
    """Context manager: the kernels' dot products at `name` ("ieee", "tf32" or "tf32x3") whatever
    the input dtype, e.g. `with precision("tf32x3"): ...`."""

    def __init__(self, name: str):
        if name not in PRECISIONS:
            raise ValueError(f"precision: unknown dot precision {name!r}; choose one of {', '.join(PRECISIONS)}")
        self.name = name

    def __enter__(self):
        global _precision_override
        self.previous, _precision_override = _precision_override, self.name
        return self

    def __exit__(self, *exc):
        global _precision_override
        _precision_override = self.previous


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def check_shapes(fn: str, q: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise TypeError(f"{fn}: backend 'triton' computes in float32; got float64 inputs (use 'chunked' or 'cpu')")
    if q.shape[-1] > MAX_DIM or v.shape[-1] > MAX_DIM:
        raise ValueError(f"{fn}: backend 'triton' supports Dk, Dv <= {MAX_DIM}, got Dk={q.shape[-1]}, Dv={v.shape[-1]}")


NAME = "triton"


class Saved(NamedTuple):
    """What run_forward keeps for the backward (chunks of CHUNK)."""

    S: torch.Tensor  # [B, H, N, Dk, Dv] the state entering every chunk
    z: torch.Tensor  # [B, H, N, Dk]
    den: torch.Tensor  # [B, H, T] the normaliser of every position


def saved_shapes(B: int, T: int, H: int, Dk: int, Dv: int, C: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of Saved for N = ceil(T / CHUNK) chunks."""
    NT = -(-T // CHUNK)
    return (B, H, NT, Dk, Dv), (B, H, NT, Dk), (B, H, T)


def run_forward(q, k, v, S0, z0, eps: float, C: int, save: bool) -> Forward:
    """The Forward record (out_acc always empty: y is kept). The chunk is CHUNK (ops checks that C is).
    Four launches: chunk states, two prefix sums, outputs (which also write the final state)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    S0, z0 = S0.float().contiguous(), z0.float().contiguous()
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    BT, BK, BV = _blocks(DK, DV)
    NT, NK, NV = triton.cdiv(T, BT), triton.cdiv(DK, BK), triton.cdiv(DV, BV)
    PREC = dot_precision(q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    kv, ks = torch.empty(B, H, NT, DK, DV, **f32), torch.empty(B, H, NT, DK, **f32)
    kernels.chunk_state_fwd_kernel[(NT, B * H, NK * NV)](
        k, v, kv, ks, T, H, DK, DV, *_strides(k), *_strides(v), BT=BT, BK=BK, BV=BV, PREC=PREC, **LAUNCH
    )
    S, c = torch.cumsum(kv, 2), torch.cumsum(ks, 2)  # S: inclusive sums, turned into entering states below
    y = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
    den = torch.empty(B, H, T, **f32)
    z = torch.empty(B, H, NT, DK, **f32) if save else den
    S_final, z_final = torch.empty_like(S0), torch.empty_like(z0)
    kernels.chunk_out_fwd_kernel[(NT, B * H, NV)](
        q,
        k,
        v,
        S,
        kv,
        c,
        ks,
        S0,
        z0,
        y,
        den,
        z,
        S_final,
        z_final,
        T,
        H,
        DK,
        DV,
        eps,
        *_strides(q),
        *_strides(v),
        *_strides(y),
        BT=BT,
        BK=BK,
        BV=BV,
        PREC=PREC,
        SAVE=save,
        **LAUNCH,
    )
    del kv, ks, c

    return result(y, S_final, z_final, None, Saved(S, z, den) if save else None, like=den)


def run_backward(q, k, v, y, out_acc, saved: Saved, do, dS_final, dz_final, eps: float, C: int) -> Grads:
    """Gradients of run_forward. Five launches: the per-chunk state gradients
    (with dden), two prefix sums, dq and dk, dv (with dS0; dz0 comes with dq and dk)."""
    S, z, den = saved
    q, k, v, y, do = q.contiguous(), k.contiguous(), v.contiguous(), y.contiguous(), do.contiguous()
    dS_final, dz_final = dS_final.float().contiguous(), dz_final.float().contiguous()
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    BT, BK, BV = _blocks(DK, DV)
    NT, NK, NV = triton.cdiv(T, BT), triton.cdiv(DK, BK), triton.cdiv(DV, BV)
    PREC = dot_precision(q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    qd, qg = torch.empty(B, H, NT, DK, DV, **f32), torch.empty(B, H, NT, DK, **f32)
    dden = torch.empty(B, H, T, **f32)
    kernels.chunk_state_bwd_kernel[(NT, B * H, NK * NV)](
        q, do, y, den, dden, qd, qg, T, H, DK, DV, *_strides(q), *_strides(do), BT=BT, BK=BK, BV=BV, PREC=PREC, **LAUNCH
    )
    Gc, gc = torch.cumsum(qd, 2), torch.cumsum(qg, 2)  # chunks in reverse order: sums over the later ones
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dS0, dz0 = torch.empty_like(dS_final), torch.empty_like(dz_final)
    kernels.chunk_dqk_bwd_kernel[(NT, B * H, NK)](
        q,
        k,
        v,
        do,
        den,
        dden,
        S,
        z,
        qd,
        Gc,
        qg,
        gc,
        dS_final,
        dz_final,
        dq,
        dk,
        dz0,
        T,
        H,
        DK,
        DV,
        *_strides(q),
        *_strides(v),
        *_strides(do),
        BT=BT,
        BK=BK,
        BV=BV,
        PREC=PREC,
        **LAUNCH,
    )
    kernels.chunk_dv_bwd_kernel[(NT, B * H, NV)](
        q,
        k,
        do,
        den,
        qd,
        Gc,
        dS_final,
        dv,
        dS0,
        T,
        H,
        DK,
        DV,
        *_strides(q),
        *_strides(do),
        BT=BT,
        BK=BK,
        BV=BV,
        PREC=PREC,
        **LAUNCH,
    )
    return Grads(dq, dk, dv, dS0, dz0)


def step(q, k, v, S, z, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token in place: q, k [B, H, Dk], v [B, H, Dv]; S [B, H, Dk, Dv] and z [B, H, Dk] contiguous
    float32, updated; returns out [B, H, Dv] (written into `out` when given: no allocation)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, DK = q.shape
    DV = v.shape[-1]
    if out is None:
        out = torch.empty_like(v)
    BK = max(16, triton.next_power_of_2(DK))
    BV = min(64, max(16, triton.next_power_of_2(DV)))
    kernels.step_kernel[(B * H,)](q, k, v, S, z, out, H, DK, DV, eps, BK=BK, BV=BV)
    return out
