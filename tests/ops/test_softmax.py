"""Softmax attention on SDPA against the explicit softmax, and its KV-cache recurrence."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import ops
from linear_transformers.ops import KVCache, naive

from helpers import rel_err


def _qkv(B, T, H, Dk, Dv, S=None, dtype=torch.float64):
    S = T if S is None else S
    return (
        torch.randn(B, T, H, Dk, dtype=dtype),
        torch.randn(B, S, H, Dk, dtype=dtype),
        torch.randn(B, S, H, Dv, dtype=dtype),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,S", [(1, 1), (17, 17), (5, 23), (64, 64)], ids=lambda x: str(x))
def test_softmax_matches_explicit(causal, T, S):
    q, k, v = _qkv(2, T, 3, 8, 5, S)
    mask = torch.rand(2, S) < 0.3
    for m in [None, mask]:
        out = ops.softmax_attention(q, k, v, causal=causal, key_padding_mask=m)
        ref = naive.softmax_attention(q, k, v, causal=causal, key_padding_mask=m)
        assert out.shape == (2, T, 3, 5)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-10


def test_fully_padded_query_gets_zeros():
    q, k, v = _qkv(1, 4, 1, 4, 4)
    mask = torch.tensor([[True, True, False, False]])
    out = ops.softmax_attention(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert rel_err(out, naive.softmax_attention(q, k, v, causal=True, key_padding_mask=mask)) < 1e-12


def test_step_with_cache_equals_parallel_and_grows():
    B, T, H, Dk, Dv = 2, 40, 2, 6, 3
    q, k, v = _qkv(B, T, H, Dk, Dv)
    ref = ops.softmax_attention(q, k, v, causal=True)
    cache = KVCache.empty(B, H, Dk, Dv, capacity=4, dtype=q.dtype)
    outs = []
    for t in range(T):
        o, cache = ops.softmax_attention_step(q[:, t], k[:, t], v[:, t], cache)
        outs.append(o)
    assert cache.length == T and cache.capacity >= T
    assert rel_err(torch.stack(outs, 1), ref) < 1e-10


def test_prefill_then_steps_equals_parallel():
    q, k, v = _qkv(2, 30, 2, 4, 4)
    ref = ops.softmax_attention(q, k, v, causal=True)
    out, cache = ops.softmax_attention_with_cache(q[:, :11], k[:, :11], v[:, :11])
    assert rel_err(out, ref[:, :11]) < 1e-10
    block, cache = ops.softmax_attention_with_cache(q[:, 11:20], k[:, 11:20], v[:, 11:20], cache)
    assert rel_err(block, ref[:, 11:20]) < 1e-10
    o, cache = ops.softmax_attention_step(q[:, 20], k[:, 20], v[:, 20], cache)
    assert rel_err(o, ref[:, 20]) < 1e-10 and cache.n_tokens == 21


def test_cache_layout_and_moves():
    cache = KVCache.empty(1, 2, 3, 4, capacity=2)
    k, v = torch.randn(1, 5, 2, 3), torch.randn(1, 5, 2, 4)
    cache.append(k, v)
    assert torch.equal(cache.keys(), k.transpose(1, 2)) and torch.equal(cache.values(), v.transpose(1, 2))
    assert cache.to(dtype=torch.float64).dtype == torch.float64
    assert cache.index_select(torch.tensor([0, 0])).keys().shape == (2, 2, 5, 3)
    with pytest.raises(ValueError, match="KVCache.append: k must have shape"):
        cache.append(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 4))
