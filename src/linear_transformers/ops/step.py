"""One token of causal linear attention as an RNN (paper Eq. 18-20): O(Dk Dv) time and memory per token."""

from __future__ import annotations

import torch

from . import triton as triton_backend
from .state import LinearState


def step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState, eps: float
) -> tuple[torch.Tensor, LinearState]:
    """q, k [B, H, Dk], v [B, H, Dv] (already checked) -> (out [B, H, Dv], state after this token).

    Without autograd (inference) S and z are updated in place with one fused rank-1 update, so a
    generation loop allocates only the output; with autograd a new state is built instead, so the
    graph through earlier states stays valid.
    """
    if (
        q.is_cuda
        and state.S.dtype == torch.float32
        and state.S.is_contiguous()
        and state.z.is_contiguous()
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state.S, state.z)))
        and triton_backend.available(q.device)
    ):
        out = triton_backend.step(q, k, v, state.S, state.z, eps)  # one fused kernel, state in place
        state.n_tokens += 1
        return out, state
    return step_pytorch(q, k, v, state, eps)


def step_pytorch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState, eps: float):
    """The same step in PyTorch operations (any device; differentiable)."""
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state.S.dtype
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state.S, state.z))
    if needs_graph or not (state.S.is_contiguous() and state.z.is_contiguous()):
        S = state.S + kf.unsqueeze(-1) * vf.unsqueeze(-2)
        z = state.z + kf
        new_state = LinearState(S, z, state.n_tokens + 1)
    else:
        S, z = state.S, state.z
        S.view(B * H, Dk, Dv).baddbmm_(kf.reshape(B * H, Dk, 1), vf.reshape(B * H, 1, Dv))
        z.add_(kf)
        state.n_tokens += 1
        new_state = state
    num = torch.matmul(qf.unsqueeze(-2), S).squeeze(-2)  # [B, H, Dv]
    den = (qf * z).sum(-1, keepdim=True).add_(eps)
    return (num / den).to(q.dtype), new_state
