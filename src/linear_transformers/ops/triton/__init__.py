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

import torch

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
    return 64, BK, BV


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _exclusive_prefix(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of the entries before each index along `dim` (the state entering each chunk)."""
    inclusive = torch.cumsum(x, dim)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), inclusive.narrow(dim, 0, x.shape[dim] - 1)], dim)


def check_shapes(fn: str, q: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise TypeError(f"{fn}: backend 'triton' computes in float32; got float64 inputs (use 'chunked' or 'cpu')")
    if q.shape[-1] > MAX_DIM or v.shape[-1] > MAX_DIM:
        raise ValueError(f"{fn}: backend 'triton' supports Dk, Dv <= {MAX_DIM}, got Dk={q.shape[-1]}, Dv={v.shape[-1]}")


def aux_shapes(B: int, T: int, H: int, Dk: int, Dv: int, C: int) -> tuple[tuple[int, ...], ...]:
    """What run_forward keeps for the backward: S and z entering every chunk of 64, the normaliser."""
    NT = -(-T // 64)
    return (B, H, NT, Dk, Dv), (B, H, NT, Dk), (B, H, T)


def run_forward(q, k, v, S0, z0, eps: float, C: int, save: bool):
    """-> (y, S_final, z_final, out_acc (always empty: y is kept), S, z, den). The chunk is 64 whatever C."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    BT, BK, BV = _blocks(DK, DV)
    NT, NK, NV = triton.cdiv(T, BT), triton.cdiv(DK, BK), triton.cdiv(DV, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    kv, ks = torch.empty(B, H, NT, DK, DV, **f32), torch.empty(B, H, NT, DK, **f32)
    kernels.chunk_state_fwd_kernel[(NT, B * H, NK * NV)](
        k, v, kv, ks, T, H, DK, DV, *_strides(k), *_strides(v), BT=BT, BK=BK, BV=BV
    )
    S = _exclusive_prefix(kv, 2) + S0[:, :, None]
    z = _exclusive_prefix(ks, 2) + z0[:, :, None]
    S_final, z_final = S[:, :, -1] + kv[:, :, -1], z[:, :, -1] + ks[:, :, -1]
    del kv, ks
    y = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
    den = torch.empty(B, H, T, **f32)
    kernels.chunk_out_fwd_kernel[(NT, B * H, NV)](
        q, k, v, S, z, y, den, T, H, DK, DV, eps, *_strides(q), *_strides(v), *_strides(y), BT=BT, BK=BK, BV=BV
    )

    def empty():  # a distinct placeholder per output: operator outputs may not alias
        return den.new_empty(0)

    if not save:
        return y, S_final, z_final, empty(), empty(), empty(), empty()
    return y, S_final, z_final, empty(), S, z, den


def run_backward(q, k, v, y, out_acc, S, z, den, do, dS_final, dz_final, eps: float, C: int):
    """Gradients of run_forward: (dq, dk, dv, dS0, dz0)."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    BT, BK, BV = _blocks(DK, DV)
    NT, NK, NV = triton.cdiv(T, BT), triton.cdiv(DK, BK), triton.cdiv(DV, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    # dden = -(dnum . out) with dnum = dout / den: per position, a cheap reduction
    dden = (-(do.float() * y.float()).sum(-1).transpose(1, 2) / den).contiguous()
    qd, qg = torch.empty(B, H, NT, DK, DV, **f32), torch.empty(B, H, NT, DK, **f32)
    kernels.chunk_state_bwd_kernel[(NT, B * H, NK * NV)](
        q, do, den, dden, qd, qg, T, H, DK, DV, *_strides(q), *_strides(do), BT=BT, BK=BK, BV=BV
    )
    # gradient of the state leaving chunk n: everything the later chunks read from it
    G = _exclusive_prefix(qd.flip(2), 2).flip(2) + dS_final.float()[:, :, None]
    g = _exclusive_prefix(qg.flip(2), 2).flip(2) + dz_final.float()[:, :, None]
    dS0, dz0 = G[:, :, 0] + qd[:, :, 0], g[:, :, 0] + qg[:, :, 0]
    del qd, qg
    dq, dk = torch.empty(B, T, H, DK, **f32), torch.empty(B, T, H, DK, **f32)
    dv = torch.empty(B, T, H, DV, **f32)
    kernels.chunk_dqkv_bwd_kernel[(NT, B * H)](
        q, k, v, do, den, dden, S, z, G, g, dq, dk, dv, T, H, DK, DV,
        *_strides(q), *_strides(v), *_strides(do), BT=BT, BK=BK, BV=BV,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dS0, dz0


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
