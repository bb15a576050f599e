"""AttentionLayer: the parallel forward and the recurrent step compute the same function with the
same weights, for every causal kind and feature map; prefill hands over the exact state."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import FEATURE_MAPS, AttentionLayer, ops
from linear_transformers.feature_maps import make_feature_map
from linear_transformers.model import ModelConfig
from linear_transformers.ops import KVCache, LinearState

from helpers import rel_err

# (causal attention refuses maps that can give negative similarities: test_maps_that_can_go_negative_are_refused)
CAUSAL = [("causal-linear", fm) for fm in FEATURE_MAPS if make_feature_map(fm, 8).non_negative]
CAUSAL += [("causal-softmax", "elu")]


def _layer(kind, fm="elu", d_model=24, n_heads=3, **kw):
    kwargs = {"feature_map_kwargs": {"seed": 0}} if fm in ("favor", "fourier") else {}
    return AttentionLayer(d_model, n_heads, kind, fm, **kwargs, **kw).double().eval()


@pytest.mark.parametrize("kind,fm", CAUSAL, ids=[f"{k}-{f}" for k, f in CAUSAL])
def test_step_equals_parallel(kind, fm):
    layer = _layer(kind, fm)
    x = torch.randn(2, 33, 24, dtype=torch.float64)
    y = layer(x)
    state, steps = None, []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        steps.append(y_t)
    assert rel_err(torch.stack(steps, 1), y) < 1e-10
    assert isinstance(state, LinearState if kind == "causal-linear" else KVCache)


@pytest.mark.parametrize("kind,fm", CAUSAL, ids=[f"{k}-{f}" for k, f in CAUSAL])
def test_prefill_then_step_equals_parallel(kind, fm):
    layer = _layer(kind, fm)
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    y = layer(x)
    y_prefix, state = layer(x[:, :25], return_state=True)
    assert state.n_tokens == 25
    y_block, state = layer(x[:, 25:31], state=state, return_state=True)
    outs = [y_prefix, y_block]
    for t in range(31, 40):
        y_t, state = layer.step(x[:, t], state)
        outs.append(y_t[:, None])
    assert rel_err(torch.cat(outs, 1), y) < 1e-10


def test_float32_step_matches_parallel():
    layer = AttentionLayer(64, 4).eval()
    x = torch.randn(3, 50, 64)
    y = layer(x)
    state, steps = layer.initial_state(3), []
    with torch.no_grad():
        for t in range(50):
            y_t, state = layer.step(x[:, t], state)
            steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["causal-linear", "linear", "causal-softmax", "softmax"])
def test_padding_invariance(kind):
    layer = _layer(kind)
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    ref = layer(x)
    pad = 10 * torch.randn(2, 5, 24, dtype=torch.float64)
    causal = kind.startswith("causal")
    # causal: pad on the left (batched prompts); non-causal: pad on the right
    xp = torch.cat([pad, x], 1) if causal else torch.cat([x, pad], 1)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    if causal:
        mask[:, :5] = True
    else:
        mask[:, 12:] = True
    out = layer(xp, key_padding_mask=mask)
    real = out[:, 5:] if causal else out[:, :12]
    assert rel_err(real, ref) < 1e-10


@pytest.mark.parametrize("kind", ["causal-linear", "linear", "causal-softmax", "softmax", "causal-lsh", "lsh"])
def test_gradients_reach_every_parameter(kind):
    layer = AttentionLayer(16, 2, kind, "hedgehog")
    layer(torch.randn(2, 9, 16)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_low_precision_layer_keeps_float32_state():
    layer = AttentionLayer(32, 4).to(torch.bfloat16)
    x = torch.randn(2, 70, 32, dtype=torch.bfloat16)
    y, state = layer(x, return_state=True)
    assert y.dtype == torch.bfloat16 and state.S.dtype == torch.float32
    y_t, state = layer.step(x[:, 0], state)
    assert y_t.dtype == torch.bfloat16 and state.n_tokens == 71


def test_different_key_and_value_widths_and_feature_dims():
    layer = AttentionLayer(24, 2, feature_map="taylor", d_keys=4, d_values=7)
    state = layer.initial_state(3)
    assert state.S.shape == (3, 2, layer.feature_map.feature_dim, 7)
    y, state = layer.step(torch.randn(3, 24), state)
    assert y.shape == (3, 24)


def test_dropout_only_in_training():
    layer = AttentionLayer(16, 2, dropout=0.5)
    x = torch.randn(2, 8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_feature_map_parameters_live_in_the_state_dict():
    layer = AttentionLayer(16, 2, feature_map="favor")
    keys = set(layer.state_dict())
    assert "feature_map.omega" in keys
    clone = AttentionLayer(16, 2, feature_map="favor")
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(1, 5, 16)
    assert torch.equal(clone(x), layer(x))


@pytest.mark.parametrize("kind", ["causal-lsh", "lsh"])
def test_lsh_layer_shares_queries_and_keys(kind):
    """One projection for queries and keys, then ops.lsh_attention with rotations from torch's RNG."""
    layer = AttentionLayer(24, 3, kind, n_hashes=2, n_buckets=4, lsh_chunk_size=5).double()
    assert layer.qkv.out_features == 3 * (8 + 8)
    x = torch.randn(2, 23, 24, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    qk, v = layer.qkv(x).unflatten(-1, (3, -1)).split([8, 8], dim=-1)
    torch.manual_seed(7)
    ref = ops.lsh_attention(qk, v, causal=kind == "causal-lsh", n_hashes=2, n_buckets=4, chunk_size=5)
    torch.testing.assert_close(y, layer.out(ref.flatten(2)))
    with pytest.raises(ValueError, match="no recurrent step" + (" .*recompute" if kind == "causal-lsh" else "")):
        layer.step(x[:, 0])
    with pytest.raises(ValueError, match="even n_buckets"):
        AttentionLayer(24, 3, kind, n_buckets=3)


def test_maps_that_can_go_negative_are_refused_for_causal_attention():
    """Random Fourier features can make the causal normaliser cross zero (training diverged with
    them): causal linear attention refuses them in one line; non-causal attention still takes them."""
    with pytest.raises(ValueError, match="'fourier' can give negative similarities.*use a non-negative map"):
        AttentionLayer(24, 3, "causal-linear", "fourier")
    AttentionLayer(24, 3, "linear", "fourier")
    with pytest.raises(ValueError, match="fourier"):
        ModelConfig(vocab_size=8, max_len=8, feature_map="fourier")
