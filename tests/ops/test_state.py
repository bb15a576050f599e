from __future__ import annotations

import pytest
import torch

from linear_transformers.ops import LinearState


def test_zeros_and_dtypes():
    s = LinearState.zeros(2, 3, 4, 5, dtype=torch.bfloat16)
    assert s.S.shape == (2, 3, 4, 5) and s.z.shape == (2, 3, 4) and s.dtype == torch.float32
    assert s.shape == (2, 3, 4, 5) and s.n_tokens == 0
    assert LinearState.zeros(1, 1, 2, 2, dtype=torch.float64).dtype == torch.float64


def test_detach_clone_to_index_select():
    S = torch.randn(2, 1, 3, 3, requires_grad=True)
    z = torch.rand(2, 1, 3, requires_grad=True)
    s = LinearState(S * 1, z * 1, 7)
    d = s.detach()
    assert not d.S.requires_grad and d.n_tokens == 7
    c = s.clone()
    assert c.S.data_ptr() != s.S.data_ptr()
    assert s.to(dtype=torch.float64).S.dtype == torch.float64
    assert s.to("cpu").device.type == "cpu"
    assert torch.equal(s.index_select(torch.tensor([1])).S, s.S[1:])
    with pytest.raises(TypeError, match="float32 or float64"):
        s.to(dtype=torch.bfloat16)


def test_rejects_inconsistent_parts():
    with pytest.raises(ValueError, match="z must have shape"):
        LinearState(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 5))
    with pytest.raises(TypeError, match="float32 or float64"):
        LinearState(torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16), torch.zeros(2, 3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"S must have 4 dimensions"):
        LinearState(torch.zeros(3, 4, 5), torch.zeros(3, 4))


@pytest.mark.parametrize("backend", ["chunked", "cpu", "naive"])
def test_a_state_whose_tensors_were_replaced_is_checked_again(backend):
    """LinearState checks its tensors when made; every op checks them again, since they can be
    replaced afterwards (a wrong z used to be read out of bounds by the C kernel)."""
    from linear_transformers import ops

    q, k, v = (torch.rand(2, 5, 3, 4) for _ in range(3))
    for replace, match in [
        (("z", torch.zeros(2, 3, 2)), r"z must have shape \[B, H, Dk\] = \[2, 3, 4\]"),
        (("z", torch.zeros(2, 3, 4, dtype=torch.float64)), "S and z must share dtype"),
        (("S", torch.zeros(2, 3, 4)), r"state: S must have 4 dimensions"),
    ]:
        state = ops.LinearState.zeros(2, 3, 4, 4)
        setattr(state, *replace)
        with pytest.raises((ValueError, TypeError), match=match):
            ops.causal_linear_attention(q, k, v, initial_state=state, backend=backend)
        with pytest.raises((ValueError, TypeError), match=match):
            ops.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state)
    state = ops.LinearState.zeros(2, 3, 4, 4)
    state.S = state.S.transpose(2, 3).contiguous().transpose(2, 3)  # not contiguous: computed right all the same
    out = ops.causal_linear_attention(q, k, v, initial_state=state, backend=backend)
    torch.testing.assert_close(out, ops.causal_linear_attention(q, k, v, backend="naive"))


def test_a_kv_cache_keeps_padding_out_of_every_later_query():
    """Keys appended as padding are never attended to: not by the block that brought them, not by
    later steps, not after the cache grows or rows are selected; the result equals softmax
    attention over the real keys alone. Bad padding is a one-line error."""
    from linear_transformers import ops
    from linear_transformers.ops import KVCache

    torch.manual_seed(0)
    B, T, H, D = 2, 7, 3, 5
    q, k, v = (torch.randn(B, T + 300, H, D, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, :4] = True  # row 1: four padding tokens, then three real ones
    cache = KVCache.empty(B, H, D, D, capacity=8, dtype=torch.float64)
    out, cache = ops.softmax_attention_with_cache(q[:, :T], k[:, :T], v[:, :T], cache, key_padding_mask=padding)
    steps = []
    for t in range(T, T + 300):  # past capacity 8: the padding record grows with the cache
        o, cache = ops.softmax_attention_step(q[:, t], k[:, t], v[:, t], cache)
        steps.append(o)
    assert cache.capacity >= T + 300 and cache.padding().shape == (B, T + 300)
    for b, n_pad in ((0, 0), (1, 4)):  # each row against attention over its real keys only
        qs, ks, vs = (x[b : b + 1, n_pad:] for x in (q, k, v))
        ref = ops.softmax_attention(qs, ks, vs, causal=True)
        torch.testing.assert_close(out[b, n_pad:], ref[0, : T - n_pad])
        torch.testing.assert_close(torch.stack(steps, 1)[b], ref[0, T - n_pad :])
    picked = cache.index_select(torch.tensor([1]))
    assert picked.padding()[0, :4].all() and not picked.padding()[0, 4:].any()
    with pytest.raises(ValueError, match=r"KVCache.append: padding must be bool \[B, T\] = \[2, 1\], got torch.float"):
        cache.append(k[:, :1], v[:, :1], torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"KVCache: padding must be bool \[B, capacity\]"):
        KVCache(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5), 0, torch.zeros(2, 3, dtype=torch.bool))
