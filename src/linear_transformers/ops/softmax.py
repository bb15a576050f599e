"""Softmax attention (the paper's baseline) on torch's scaled_dot_product_attention, and its
recurrent form with a key/value cache ("stateful softmax", paper Appendix C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import KVCache


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Head-major core: q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv] -> [B, H, T, Dv].

    Causal masking aligns the queries with the *last* T keys (query i sees keys j <= i + S - T), which
    is what a query block appended to a cache needs. A query with no visible key outputs zeros.
    """
    T, S = q.shape[2], k.shape[2]
    if key_padding_mask is None and (not causal or T == S):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, scale=scale, dropout_p=dropout_p)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(S - T)
    allowed = allowed.expand(q.shape[0], 1, T, S)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    empty_rows = ~allowed.any(-1, keepdim=True)  # [B, 1, T, 1]
    # A fully masked row would make softmax NaN; let it see everything, then zero its output.
    allowed = allowed | empty_rows
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout_p)
    return out.masked_fill(empty_rows, 0.0)


def attend_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    *,
    scale: float | None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append k, v [B, T, H, D] to `cache` (key_padding_mask [B, T]: which of them are padding),
    then let q [B, T, H, Dk] attend causally to everything cached but padding. Returns [B, T, H, Dv]."""
    cache.append(k, v, key_padding_mask)
    out = attend(
        q.transpose(1, 2), cache.keys(), cache.values(), causal=True, key_padding_mask=cache.padding(), scale=scale
    )
    return out.transpose(1, 2)
