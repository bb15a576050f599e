"""Slow, obviously correct references. Every fast path is tested against these.

All of them take feature-mapped (non-negative) queries and keys in the public layout [B, T, H, D],
compute in the accumulation dtype (float32, float64 for float64 inputs) and return outputs in the
input dtype. Gradients come from plain autograd.
"""

from __future__ import annotations

import torch

from .state import LinearState
from .validation import accumulation_dtype


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Non-causal kernel attention as an explicit [T, S] matrix (paper Eq. 4 with sim = q.k).

    q [B, T, H, Dk], k [B, S, H, Dk], v [B, S, H, Dv] -> [B, T, H, Dv].
    """
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf = (x.to(acc) for x in (q, k, v))
    scores = torch.einsum("bthd,bshd->bhts", qf, kf)  # [B, H, T, S]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    num = torch.einsum("bhts,bshd->bthd", scores, vf)
    den = scores.sum(-1).transpose(1, 2) + eps  # [B, T, H]
    return (num / den[..., None]).to(q.dtype)


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    initial_state: LinearState | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearState]:
    """Causal linear attention in its quadratic masked form (paper Eq. 9 with the normaliser).

    V'_i = (phi(Q_i)^T S_0 + sum_{j<=i} (phi(Q_i).phi(K_j)) V_j) / (phi(Q_i)^T z_0 + sum_{j<=i} phi(Q_i).phi(K_j) + eps)
    q, k [B, T, H, Dk], v [B, T, H, Dv] -> ([B, T, H, Dv], final LinearState).
    """
    acc = accumulation_dtype(q.dtype)
    qf, kf, vf = (x.to(acc) for x in (q, k, v))
    T = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", qf, kf).tril()  # [B, H, T, T], keys j <= query i
    num = torch.einsum("bhts,bshd->bthd", scores, vf)
    den = scores.sum(-1).transpose(1, 2)  # [B, T, H]
    S = torch.einsum("bshd,bshe->bhde", kf, vf)
    z = kf.sum(1)  # [B, H, Dk]
    n_tokens = T
    if initial_state is not None:
        num = num + torch.einsum("bthd,bhde->bthe", qf, initial_state.S)
        den = den + torch.einsum("bthd,bhd->bth", qf, initial_state.z)
        S = S + initial_state.S
        z = z + initial_state.z
        n_tokens += initial_state.n_tokens
    out = num / (den + eps)[..., None]
    return out.to(q.dtype), LinearState(S, z, n_tokens)


def causal_linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    initial_state: LinearState | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearState]:
    """The same function as an RNN, one token at a time (paper Eq. 18-20). Same signature as above."""
    acc = accumulation_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if initial_state is None:
        S = q.new_zeros(B, H, Dk, Dv, dtype=acc)
        z = q.new_zeros(B, H, Dk, dtype=acc)
        n_tokens = 0
    else:
        S, z, n_tokens = initial_state.S, initial_state.z, initial_state.n_tokens
    outs = []
    for t in range(T):
        qt, kt, vt = q[:, t].to(acc), k[:, t].to(acc), v[:, t].to(acc)  # [B, H, D]
        S = S + kt[..., :, None] * vt[..., None, :]
        z = z + kt
        num = torch.einsum("bhd,bhde->bhe", qt, S)
        den = torch.einsum("bhd,bhd->bh", qt, z) + eps
        outs.append(num / den[..., None])
    out = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, Dv, dtype=acc)
    return out.to(q.dtype), LinearState(S, z, n_tokens + T)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention written out: softmax(q k^T * scale) v, [B, T, H, D] layout.

    A query with no key to attend to (all masked) outputs zeros. With `causal`, query i sees
    keys j <= i + (S - T), i.e. queries are the last T positions of the key sequence.
    """
    acc = accumulation_dtype(q.dtype)
    T, S, Dk = q.shape[1], k.shape[1], q.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q.to(acc), k.to(acc)) * scale
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    allowed = allowed.expand(q.shape[0], 1, T, S)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key give NaN -> 0
    return torch.einsum("bhts,bshd->bthd", weights, v.to(acc)).to(q.dtype)


def lsh_attended(buckets: torch.Tensor, chunk_size: int, causal: bool) -> torch.Tensor:
    """Which keys each query may attend to in each LSH round, built position by position.

    buckets [B, H, R, T] -> bool [B, H, R, T(query), T(key)]: key j is in query i's set when, in the
    round's order sorted by (bucket, position), j's chunk is i's chunk or the one before it, j <= i
    if causal. (A query's own key is in its set; `lsh_attention` scores it at SELF_SCORE.)
    """
    T = buckets.shape[-1]
    order = (buckets * T + torch.arange(T, device=buckets.device)).argsort(dim=-1)
    rank = order.argsort(dim=-1)  # position -> place in the sorted sequence
    chunk = rank // chunk_size
    diff = chunk.unsqueeze(-1) - chunk.unsqueeze(-2)  # query chunk - key chunk
    attended = (diff == 0) | (diff == 1)
    if causal:
        attended &= torch.ones(T, T, dtype=torch.bool, device=buckets.device).tril()
    return attended


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor,
    *,
    causal: bool,
    chunk_size: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reformer LSH attention as dense [T, T] scores under the mask of `lsh_attended` (the reference
    of `ops.lsh.lsh_attention`, which never forms T x T)."""
    from .lsh import MASKED, SELF_SCORE, hash_buckets

    acc = accumulation_dtype(qk.dtype)
    T, D = qk.shape[1], qk.shape[3]
    q = qk.to(acc)
    k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    attended = lsh_attended(hash_buckets(qk, rotations, key_padding_mask), chunk_size, causal)  # [B, H, R, T, T]
    if key_padding_mask is not None:
        attended &= ~key_padding_mask[:, None, None, None, :]
    scores = torch.einsum("bthd,bshd->bhts", q, k).unsqueeze(2) * D**-0.5  # [B, H, 1, T, T]
    eye = torch.eye(T, dtype=torch.bool, device=qk.device)
    scores = torch.where(eye, SELF_SCORE, scores)
    scores = scores.masked_fill(~attended, MASKED)
    lse = scores.logsumexp(dim=-1)  # [B, H, R, T]
    out = torch.einsum("bhrts,bshd->bhrtd", torch.exp(scores - lse.unsqueeze(-1)), v.to(acc))
    out = (out * torch.softmax(lse, dim=2).unsqueeze(-1)).sum(dim=2)
    return out.permute(0, 2, 1, 3).to(v.dtype)
