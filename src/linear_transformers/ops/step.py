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
        out, S, z = step_functional(qf, kf, vf, state.S, state.z, eps)
        return out.to(q.dtype), LinearState(S, z, state.n_tokens + 1)
    state.S.view(B * H, Dk, Dv).baddbmm_(kf.reshape(B * H, Dk, 1), vf.reshape(B * H, 1, Dv))
    state.z.add_(kf)
    state.n_tokens += 1
    return readout(qf, state.S, state.z, eps).to(q.dtype), state


def step_functional(q, k, v, S, z, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step as a pure function of tensors (autograd, tracing and export):
    q, k [B, H, Dk], v [B, H, Dv], S [B, H, Dk, Dv], z [B, H, Dk] -> (out, S + k v^T, z + k)."""
    S = S + k.unsqueeze(-1) * v.unsqueeze(-2)
    z = z + k
    return readout(q, S, z, eps), S, z


def readout(q: torch.Tensor, S: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """phi(q)^T S / (phi(q)^T z + eps) for q [B, H, Dk] against a state that includes this token."""
    num = torch.matmul(q.unsqueeze(-2), S).squeeze(-2)  # [B, H, Dv]
    return num / ((q * z).sum(-1, keepdim=True) + eps)
