"""Chunkwise-parallel causal linear attention in PyTorch, with a memory-efficient backward.

The normaliser is fused by giving every value an extra constant component: V~ = [V | 1] and the
state U = [S | z] (Dk x (Dv + 1)). Then numerator and normaliser come out of the same matmuls,
num~ = [num | den - eps]. The sequence is cut into chunks of C tokens; within chunk n the causal
products are a masked C x C matmul, earlier chunks enter through U_n = U_0 + sum_{m<n} K_m^T V~_m:

    A_n    = tril(Q_n K_n^T)                           [C, C]
    num~_n = A_n V~_n + Q_n U_n                        [C, Dv + 1]
    out_n  = num~_n[:, :Dv] / (num~_n[:, Dv] + eps)

The backward (paper Sec. 3.3.1, Algorithm 1, done chunkwise) keeps one state per chunk, never one
per position. With dnum~ = [dout / den | -(dout . out) / den]:

    dA_n  = tril(dnum~_n V~_n^T)
    dQ_n  = dA_n K_n + dnum~_n U_n^T
    dK_n  = dA_n^T Q_n + V~_n G_{n+1}^T
    dV~_n = A_n^T dnum~_n + K_n G_{n+1}              (the last column, d of the constant 1, is dropped)
    G_n   = G_{n+1} + Q_n^T dnum~_n,   G_N = grad of the final [S | z]

and G_0 is the gradient of the initial state: twelve batched GEMMs per chunk in all (four forward).

Chunks are processed a *block* of chunks at a time: every op inside a block works on
[n, B, H, C, D] tensors small enough to stay in cache, and the state is carried from block to
block (forwards in the forward pass, backwards in the backward pass). Temporaries stay small and
are reused (no page-faulting fresh allocations), and outputs and gradients are written straight
into their [B, T, H, D] tensors. Everything is computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .records import Forward, Grads, result

# Elements of one [n, B, H, C, C] block temporary; 2**18 floats = 1 MiB keeps a block's working set in L2.
BLOCK_ELEMENTS = 2**18


def _chunks_per_block(batch_heads: int, C: int, D: int) -> int:
    return max(1, BLOCK_ELEMENTS // (batch_heads * C * max(C, D)))


def _load(x: torch.Tensor, t0: int, n: int, C: int, dtype: torch.dtype, extra: int = 0) -> torch.Tensor:
    """Tokens [t0, t0 + n C) of x [B, T, H, D] as chunks [n, B, H, C, D + extra] in `dtype`, zero-padded
    past T; the `extra` trailing components are left unwritten for the caller."""
    B, T, H, D = x.shape
    buf = torch.empty(n, B, H, C, D + extra, dtype=dtype, device=x.device)
    out = buf[..., :D] if extra else buf
    full = min(n, (T - t0) // C)
    if full:
        out[:full].copy_(x[:, t0 : t0 + full * C].unflatten(1, (full, C)).permute(1, 0, 3, 2, 4))
    if full < n:
        rem = T - t0 - full * C
        out[full, :, :, :rem].copy_(x[:, t0 + full * C :].transpose(1, 2))
        out[full, :, :, rem:].zero_()
    return buf


def _load_values(v: torch.Tensor, t0: int, n: int, C: int, dtype: torch.dtype) -> torch.Tensor:
    """V~ = [V | 1] chunks [n, B, H, C, Dv + 1]. Padded positions get a 1 too; harmless, since their
    keys are zero they reach neither A nor the state."""
    Va = _load(v, t0, n, C, dtype, extra=1)
    Va[..., -1] = 1.0
    return Va


def _store(dst: torch.Tensor, t0: int, x: torch.Tensor) -> None:
    """Write chunks x [n, B, H, C, D] into tokens [t0, t0 + n C) of dst [B, T, H, D], dropping padding."""
    n, C, T = x.shape[0], x.shape[3], dst.shape[1]
    full = min(n, (T - t0) // C)
    if full:
        dst[:, t0 : t0 + full * C].unflatten(1, (full, C)).copy_(x[:full].permute(1, 0, 3, 2, 4))
    if full < n:
        rem = T - t0 - full * C
        dst[:, t0 + full * C :].copy_(x[full, :, :, :rem].transpose(1, 2))


def _batch(x: torch.Tensor) -> torch.Tensor:
    """[..., m, n] -> [batch, m, n]; a view for our tensors (contiguous batch dims, maybe transposed matrices)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Batched matmul [..., m, k] @ [..., k, p] -> [..., m, p], optionally into a contiguous `out`."""
    if out is None:
        return torch.bmm(_batch(a), _batch(b)).view(*a.shape[:-1], b.shape[-1])
    torch.bmm(_batch(a), _batch(b), out=out.view(-1, out.shape[-2], out.shape[-1]))
    return out


def _addbmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place (acc contiguous)."""
    acc.view(-1, acc.shape[-2], acc.shape[-1]).baddbmm_(_batch(a), _batch(b))
    return acc


def _blocks(T: int, C: int, per_block: int) -> list[tuple[int, int, int]]:
    """(first chunk index, first token, number of chunks) for each block."""
    N = -(-T // C)
    return [(n0, n0 * C, min(per_block, N - n0)) for n0 in range(0, N, per_block)]


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    U0: torch.Tensor,
    eps: float,
    C: int,
    save_for_backward: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """q, k [B, T, H, Dk], v [B, T, H, Dv], U0 = [S0 | z0] [B, H, Dk, Dv + 1] (T >= 1).

    Returns out [B, T, H, Dv] in the accumulation dtype and a dict with the final state U_final
    [B, H, Dk, Dv + 1], the normaliser den [N, B, H, C] and, when `save_for_backward`, every chunk's
    entering state U [N + 1, B, H, Dk, Dv + 1] and the masked in-chunk scores A [N, B, H, C, C].
    """
    acc = U0.dtype
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N = -(-T // C)
    per_block = _chunks_per_block(B * H, C, max(Dk, Dv))
    out = torch.empty(B, T, H, Dv, dtype=acc, device=q.device)
    # Every chunk's entering state is kept only for the backward; inference keeps one block's worth.
    U = torch.empty((N if save_for_backward else per_block) + 1, B, H, Dk, Dv + 1, dtype=acc, device=q.device)
    den = torch.empty(N, B, H, C, dtype=acc, device=q.device)
    A_all = torch.empty(N, B, H, C, C, dtype=acc, device=q.device) if save_for_backward else None
    U[0] = U0
    last = 0
    for n0, t0, n in _blocks(T, C, per_block):
        if save_for_backward:
            Ub = U[n0 : n0 + n + 1]
        else:
            Ub = U[: n + 1]
            if last:
                Ub[0] = U[last]
            last = n
        Q, K, Va = _load(q, t0, n, C, acc), _load(k, t0, n, C, acc), _load_values(v, t0, n, C, acc)
        Kt = K.transpose(-1, -2)
        _bmm(Kt, Va, out=Ub[1:])
        for i in range(1, n + 1):  # U_i = U_{i-1} + K^T V~ of chunk i-1 (faster than cumsum)
            Ub[i] += Ub[i - 1]
        A = _bmm(Q, Kt, out=None if A_all is None else A_all[n0 : n0 + n]).tril_()
        num = _addbmm_(_bmm(Q, Ub[:n]), A, Va)
        d = torch.add(num[..., Dv], eps, out=den[n0 : n0 + n])
        _store(out, t0, num[..., :Dv].div_(d.unsqueeze(-1)))
    saved = {"U_final": U[N if save_for_backward else last], "den": den}
    if A_all is not None:
        saved["U"], saved["A"] = U, A_all
    return out, saved


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    U: torch.Tensor,
    den: torch.Tensor,
    A_all: torch.Tensor,
    dout: torch.Tensor,
    dU_final: torch.Tensor,
    C: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `forward`: dq, dk, dv [B, T, H, D] in the accumulation dtype, and dU0."""
    acc = U.dtype
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dq = torch.empty(B, T, H, Dk, dtype=acc, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty(B, T, H, Dv, dtype=acc, device=q.device)
    G = dU_final  # gradient of the state leaving the current block
    for n0, t0, n in reversed(_blocks(T, C, _chunks_per_block(B * H, C, max(Dk, Dv)))):
        Q, K, Va = _load(q, t0, n, C, acc), _load(k, t0, n, C, acc), _load_values(v, t0, n, C, acc)
        d = den[n0 : n0 + n].unsqueeze(-1)
        dnum = _load(dout, t0, n, C, acc, extra=1)  # becomes [dout / den | -(dout . out) / den]
        dnum[..., :Dv].div_(d)
        torch.sum(dnum[..., :Dv] * _load(out, t0, n, C, acc), -1, out=dnum[..., Dv]).neg_()

        Gs = torch.empty(n + 1, *G.shape, dtype=acc, device=q.device)  # Gs[i] = dL/dU_{n0+i}
        _bmm(Q.transpose(-1, -2), dnum, out=Gs[:n])
        Gs[n] = G
        for i in range(n - 1, -1, -1):
            Gs[i] += Gs[i + 1]

        dA = _bmm(dnum, Va.transpose(-1, -2)).tril_()
        dQ = _addbmm_(_bmm(dA, K), dnum, U[n0 : n0 + n].transpose(-1, -2))
        _store(dq, t0, dQ)
        dK = _addbmm_(_bmm(dA.transpose(-1, -2), Q), Va, Gs[1:].transpose(-1, -2))
        _store(dk, t0, dK)
        dVa = _addbmm_(_bmm(A_all[n0 : n0 + n].transpose(-1, -2), dnum), K, Gs[1:])
        _store(dv, t0, dVa[..., :Dv])
        G = Gs[0]
    return dq, dk, dv, G


NAME = "chunked"


class Saved(NamedTuple):
    """What run_forward keeps for the backward: O(T (C + 1) + (T / C) Dk (Dv + 1)) numbers, never a
    state per position."""

    U: torch.Tensor  # [N + 1, B, H, Dk, Dv + 1] the state [S | z] entering every chunk (and the last)
    den: torch.Tensor  # [N, B, H, C] the normaliser of every position
    A: torch.Tensor  # [N, B, H, C, C] the masked in-chunk scores


def saved_shapes(B: int, T: int, H: int, Dk: int, Dv: int, C: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of Saved for N = ceil(T / C) chunks."""
    N = -(-T // C)
    return (N + 1, B, H, Dk, Dv + 1), (N, B, H, C), (N, B, H, C, C)


def run_forward(q, k, v, S0, z0, eps: float, C: int, save: bool) -> Forward:
    """The Forward record; out_acc is the float32 output for half inputs (empty otherwise: y is it),
    and Saved is empty unless `save`."""
    U0 = torch.cat([S0, z0.unsqueeze(-1)], dim=-1)
    out, saved = forward(q, k, v, U0, eps, C, save_for_backward=save)
    y = out.to(q.dtype)
    U_final = saved["U_final"]
    S_final, z_final = U_final[..., :-1].clone(), U_final[..., -1].clone()

    out_acc = out if (save and y is not out) else None
    kept = Saved(saved["U"], saved["den"], saved["A"]) if save else None
    return result(y, S_final, z_final, out_acc, kept, like=out)


def run_backward(q, k, v, y, out_acc, saved: Saved, dy, dS_final, dz_final, eps: float, C: int) -> Grads:
    """Gradients of run_forward."""
    U, den, A = saved
    out = out_acc if out_acc.numel() else y
    dU_final = torch.cat([dS_final, dz_final.unsqueeze(-1)], dim=-1).to(U.dtype)
    dq, dk, dv, dU0 = backward(q, k, v, out, U, den, A, dy, dU_final, C)
    return Grads(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dU0[..., :-1].contiguous(), dU0[..., -1].contiguous())
