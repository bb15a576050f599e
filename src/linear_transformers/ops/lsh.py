"""Reformer's LSH attention (Kitaev et al. 2020), the paper's second baseline.

Queries and keys share one projection `qk` [B, T, H, D]; keys are the unit-normalised qk. Each of
`n_hashes` rounds hashes every position with a random rotation R [D, n_buckets / 2]:
bucket(x) = argmax([xR, -xR]) (angular LSH), sorts the positions by (bucket, position), cuts the
sorted sequence into chunks of `chunk_size` and lets every query attend to the keys of its own chunk
and of the previous one (chunk 0 has no previous chunk; nothing wraps around). Within that set:

    causal        keys after the query are masked;
    self          a query scores its own key at SELF_SCORE (-1e5), so it attends to itself only when
                  it has nothing else to attend to (the first token of a causal sequence);
    padding       keys marked by key_padding_mask are masked, and padded positions are given a bucket
                  past all others, so they sort last and what padding holds never moves real
                  positions between chunks.

Each round gives an output o_r and the log-sum-exp l_r of its scores; the rounds are combined as
sum_r softmax_r(l_r) o_r (the paper's multi-round combination; a pair of positions that meets in
several rounds is counted in each, as in the reimplementation the linear-transformers paper timed).

The default chunk is the average bucket, ceil(T / n_buckets) (Kitaev et al.: m = l / n_buckets). The
attention costs O(n_hashes * T * 2 * chunk_size * D), the hash O(n_hashes * T * D * n_buckets / 2)
plus the sort: with a fixed chunk and n_buckets growing as T / chunk, the hash is quadratic in T
(Reformer's factorised buckets, not implemented, avoid that). Scores, softmax and the combination
are computed in float32 (float64 for float64 inputs); the output has the input dtype.
"""

from __future__ import annotations

import math

import torch

from .validation import accumulation_dtype

SELF_SCORE = -1e5  # a query's score for its own key (Reformer: attend to yourself only when alone)
MASKED = -1e9  # the dense reference's masked score (finite: a row with nothing valid stays finite)


def _check(qk: torch.Tensor, v: torch.Tensor, n_hashes: int, n_buckets: int, chunk_size: int | None) -> None:
    if qk.dim() != 4 or v.dim() != 4 or qk.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"lsh_attention: qk must be [B, T, H, D] and v [B, T, H, Dv] with the same B, T, H; "
            f"got qk {list(qk.shape)} and v {list(v.shape)}"
        )
    if not qk.is_floating_point() or qk.dtype != v.dtype:
        raise TypeError(f"lsh_attention: qk and v must share one floating dtype, got {qk.dtype} and {v.dtype}")
    if n_hashes < 1:
        raise ValueError(f"lsh_attention: n_hashes must be >= 1, got {n_hashes}")
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"lsh_attention: n_buckets must be even and >= 2 (angular LSH: [xR, -xR]), got {n_buckets}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"lsh_attention: chunk_size must be >= 1, got {chunk_size}")


def random_rotations(
    n_heads: int,
    dim: int,
    n_hashes: int,
    n_buckets: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian random rotations [H, D, n_hashes, n_buckets // 2] (a fresh draw per call, as Reformer)."""
    r = torch.randn(n_heads, dim, n_hashes, n_buckets // 2, generator=generator, dtype=torch.float32)
    return r.to(device=device, dtype=dtype)


def hash_buckets(
    qk: torch.Tensor, rotations: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Bucket of every position in every round: qk [B, T, H, D] -> [B, H, n_hashes, T] (int64);
    padded positions (key_padding_mask True) get bucket n_buckets, after every real one."""
    rotated = torch.einsum("bthd,hdrk->bhrtk", qk.detach().to(rotations.dtype), rotations)
    buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    if key_padding_mask is not None:
        buckets = buckets.masked_fill(key_padding_mask.to(buckets.device)[:, None, None, :], 2 * rotations.shape[-1])
    return buckets


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    n_hashes: int = 1,
    n_buckets: int = 64,
    chunk_size: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    rotations: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reformer LSH attention: qk [B, T, H, D] (shared queries/keys), v [B, T, H, Dv] -> [B, T, H, Dv].

    chunk_size: sorted positions per chunk (default ceil(T / n_buckets)). rotations: [H, D,
    n_hashes, n_buckets // 2] to hash with (default: drawn from `generator`, or torch's global RNG).
    key_padding_mask: bool [B, T], True at padding (never attended to; outputs there are undefined).
    """
    _check(qk, v, n_hashes, n_buckets, chunk_size)
    B, T, H, D = qk.shape
    Dv = v.shape[-1]
    acc = accumulation_dtype(qk.dtype)
    if rotations is None:
        rotations = random_rotations(H, D, n_hashes, n_buckets, generator=generator, device=qk.device)
    elif rotations.shape != (H, D, n_hashes, n_buckets // 2):
        raise ValueError(
            f"lsh_attention: rotations must be [H, D, n_hashes, n_buckets // 2] = {[H, D, n_hashes, n_buckets // 2]}, "
            f"got {list(rotations.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.shape != (B, T):
        raise ValueError(
            f"lsh_attention: key_padding_mask must be [B, T] = {[B, T]}, got {list(key_padding_mask.shape)}"
        )
    m = chunk_size or max(1, math.ceil(T / n_buckets))
    n_chunks = math.ceil(T / m)
    pad = n_chunks * m - T
    R = n_hashes

    buckets = hash_buckets(qk, rotations, key_padding_mask)  # [B, H, R, T]
    positions = torch.arange(T, device=qk.device)
    perm = (buckets * T + positions).argsort(dim=-1)  # sorted by (bucket, position): [B, H, R, T]

    # gather per round in sorted order, padded to whole chunks with slots that are never attended to
    q_h = qk.to(acc).permute(0, 2, 1, 3)  # [B, H, T, D]
    k_h = q_h / q_h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    v_h = v.to(acc).permute(0, 2, 1, 3)

    def sort(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, E] -> [B, H, R, n_chunks, m, E]
        idx = perm.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1])
        xs = x.unsqueeze(2).expand(-1, -1, R, -1, -1).gather(3, idx)
        return torch.nn.functional.pad(xs, (0, 0, 0, pad)).unflatten(3, (n_chunks, m))

    def look_one_back(x: torch.Tensor) -> torch.Tensor:  # [..., n_chunks, m, E] -> [..., n_chunks, 2m, E]
        return torch.cat([torch.roll(x, 1, dims=-3), x], dim=-2)

    qs, ks, vs = sort(q_h), look_one_back(sort(k_h)), look_one_back(sort(v_h))
    pos_q = torch.nn.functional.pad(perm, (0, pad), value=-1).unflatten(-1, (n_chunks, m))  # -1: a pad slot
    pos_k = look_one_back(pos_q.unsqueeze(-1)).squeeze(-1)  # [B, H, R, n_chunks, 2m]
    valid = pos_k >= 0
    valid[..., 0, :m] = False  # chunk 0 has no previous chunk (the roll wrapped the last one in)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(qk.device)[:, None, None, None, :].expand(-1, H, R, n_chunks, -1)
        valid &= ~kpm.gather(-1, pos_k.clamp_min(0))
    with torch.no_grad():  # which keys each query attends to: positions only, no gradient
        allowed = valid.unsqueeze(-2)
        if causal:
            allowed = allowed & (pos_k.unsqueeze(-2) <= pos_q.unsqueeze(-1))
        is_self = pos_k.unsqueeze(-2) == pos_q.unsqueeze(-1)
        others = allowed & ~is_self
        alone = others.view(torch.uint8).amax(dim=-1, keepdim=True) == 0  # (faster than .any on the CPU)
        # a query's own key only when it has nothing else (`allowed` also drops the copy of the query
        # that the wrapped-around look-back holds when there is a single chunk); rows with nothing at
        # all (pad slots, padded queries) attend everywhere, so that every row stays finite
        attend = others | (is_self & allowed & alone)
        attend |= attend.view(torch.uint8).amax(dim=-1, keepdim=True) == 0
        bias = torch.zeros(attend.shape, dtype=acc, device=qk.device).masked_fill_(~attend, float("-inf"))
    scores = torch.baddbmm(
        bias.flatten(0, 3), qs.flatten(0, 3), ks.flatten(0, 3).transpose(-1, -2), alpha=D**-0.5
    ).view(bias.shape)  # [B, H, R, n_chunks, m, 2m]
    p = torch.softmax(scores, dim=-1)
    out = p @ vs  # [B, H, R, n_chunks, m, Dv]
    # log-sum-exp without another pass of exp: lse = s_j - log p_j at the row's largest p_j (its
    # gradient is p, as it should be). A query alone in its set scores its own key at SELF_SCORE:
    # that round then weighs ~0 in the combination unless the query is alone in every round.
    p_top, j = p.max(dim=-1, keepdim=True)
    lse = torch.where(alone, SELF_SCORE, scores.gather(-1, j) - p_top.log())

    # back to the original order, then combine the rounds by their log-sum-exp
    inverse = perm.argsort(dim=-1)
    out = out.flatten(3, 4)[..., :T, :].gather(3, inverse.unsqueeze(-1).expand(-1, -1, -1, -1, Dv))
    lse = lse.flatten(3, 5)[..., :T].gather(3, inverse)  # [B, H, R, T]
    weights = torch.softmax(lse, dim=2).unsqueeze(-1)
    return (out * weights).sum(dim=2).permute(0, 2, 1, 3).to(v.dtype)
