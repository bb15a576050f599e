"""Context parallelism: one sequence split along time over the ranks of a torch.distributed group.

Rank r holds tokens [t_r, t_{r+1}) of every sequence of the batch. Causal linear attention needs,
before its first token, the state of all earlier tokens: a sum over the earlier ranks' segments. So

    C_r    = [sum_{j in segment r} phi(k_j) v_j^T | sum_j phi(k_j)]   (+ U_0 on rank 0)   [B, H, Dk, Dv + 1]
    P_r    = sum_{s < r} C_s                                          one all_gather of C
    out_r  = causal_linear_attention(segment r, initial_state = P_r)  any backend

and the backward runs the same in reverse: the gradient of C_r is the sum of the gradients of the
later ranks' P (one all_gather of dP), added to what the backend's backward gives for the state.
Each rank sends and receives world x B x H x Dk x (Dv + 1) numbers per attention layer and
direction, whatever the sequence length (as LASP-2 does with its all-gather). Nothing is stored per
position beyond what the backend itself keeps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .packed import local_sums
from .state import LinearState

__all__ = ["ExclusivePrefix", "exchanged_numbers", "segment", "tokens_before"]


class ExclusivePrefix(torch.autograd.Function):
    """C_r (this rank's contribution) -> P_r = sum_{s < r} C_s over the ranks of `group`, with
    dC_r = sum_{s > r} dP_s in the backward: one all_gather each way."""

    @staticmethod
    def forward(ctx, C: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        rank = dist.get_rank(group)
        parts = _all_gather(C, group)
        return torch.stack(parts[:rank]).sum(0) if rank else torch.zeros_like(C)

    @staticmethod
    def backward(ctx, d_prefix: torch.Tensor):
        rank = dist.get_rank(ctx.group)
        later = _all_gather(d_prefix, ctx.group)[rank + 1 :]
        return (torch.stack(later).sum(0) if later else torch.zeros_like(d_prefix)), None


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def exchanged_numbers(world: int, B: int, H: int, Dk: int, Dv: int) -> int:
    """Numbers one rank receives per attention call in the forward (twice that in the backward):
    independent of the sequence length."""
    return world * B * H * Dk * (Dv + 1)


def segment(T: int, rank: int, world: int) -> tuple[int, int]:
    """The tokens [start, end) of a length-T sequence that `rank` of `world` holds: contiguous,
    the first T % world ranks one token longer."""
    base, extra = divmod(T, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def causal(q, k, v, group, initial_state: LinearState | None, eps: float, chunk_size: int, run):
    """This rank's outputs and the state after its segment (on the last rank: after the whole
    sequence). `run(q, k, v, initial_state, eps, chunk_size)` is the chosen backend."""
    C = local_sums(k, v)  # [B, H, Dk, Dv + 1]
    U0 = None
    if initial_state is not None:  # (only on the first rank: checked by the caller)
        U0 = torch.cat([initial_state.S, initial_state.z.unsqueeze(-1)], dim=-1)
        C = C + U0
    prefix = ExclusivePrefix.apply(C, group)
    # the first rank starts from U0 + its (zero) prefix: every rank's outputs depend on its prefix, so
    # every rank takes part in the backward's all_gather
    if U0 is not None:
        prefix = prefix + U0
    start = LinearState(
        prefix[..., :-1].contiguous(),
        prefix[..., -1].contiguous(),
        initial_state.n_tokens if initial_state is not None else 0,
    )
    return run(q, k, v, start, eps, chunk_size)


def tokens_before(count: int, group, device: torch.device) -> int:
    """The sum of the earlier ranks' `count`s in `group` (one all_gather of a number)."""
    counts = _all_gather(torch.tensor([count], dtype=torch.long, device=device), group)
    return int(sum(c.item() for c in counts[: dist.get_rank(group)]))
