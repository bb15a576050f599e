"""Bad inputs raise ValueError/TypeError naming the argument and what was seen."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import AttentionLayer, ops
from linear_transformers.ops import LinearState


def _qkv(B=2, T=5, H=3, Dk=4, Dv=6, dtype=torch.float32):
    return (
        torch.rand(B, T, H, Dk, dtype=dtype),
        torch.rand(B, T, H, Dk, dtype=dtype),
        torch.rand(B, T, H, Dv, dtype=dtype),
    )


CAUSAL = [
    pytest.param(
        lambda q, k, v: (q, k[:1], v),
        ValueError,
        r"k must have shape \[B, S, H, Dk\] = \[2, S, 3, 4\]"
        r".*got \[1, 5, 3, 4\]",
        id="batch",
    ),
    pytest.param(
        lambda q, k, v: (q, k[:, :4], v[:, :4]), ValueError, r"as many keys as queries; q has T=5", id="time-k"
    ),
    pytest.param(
        lambda q, k, v: (q, k, v[:, :4]),
        ValueError,
        r"v must have shape \[B, S, H, Dv\] = \[2, 5, 3, Dv\]",
        id="time-v",
    ),
    pytest.param(lambda q, k, v: (q, k[:, :, :2], v), ValueError, r"k must have shape", id="heads"),
    pytest.param(lambda q, k, v: (q, k[..., :3], v), ValueError, r"got \[2, 5, 3, 3\]", id="dim"),
    pytest.param(
        lambda q, k, v: (q[0], k, v),
        ValueError,
        r"q must have 4 dimensions \[B, T, H, Dk\], got shape \[5, 3, 4\]",
        id="rank",
    ),
    pytest.param(
        lambda q, k, v: (q, k.double(), v),
        TypeError,
        r"one dtype; q is torch.float32, k is torch.float64",
        id="dtype-mix",
    ),
    pytest.param(lambda q, k, v: (q, k, v.to(torch.int32)), TypeError, r"v must have a floating dtype", id="int"),
    pytest.param(lambda q, k, v: (q, k, v.to("meta")), ValueError, r"one device; q is on cpu, v on meta", id="device"),
    pytest.param(lambda q, k, v: (q.tolist(), k, v), TypeError, r"q must be a torch.Tensor", id="not-tensor"),
]


@pytest.mark.parametrize("mutate,exc,match", CAUSAL)
def test_causal_rejects_bad_inputs(mutate, exc, match):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=match):
        ops.causal_linear_attention(q, k, v)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
        (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
        (dict(eps=-1e-3), ValueError, "eps must be >= 0, got -0.001"),
        (dict(eps="small"), TypeError, "eps must be a float"),
        (
            dict(backend="cuda-magic"),
            ValueError,
            "unknown backend 'cuda-magic'; choose one of 'auto', 'naive', 'chunked', 'cpu', 'triton'",
        ),
        (
            dict(backend="triton", chunk_size=32),
            ValueError,
            "backend 'triton' computes in chunks of 64, not chunk_size=32; pass chunk_size=64 or another backend",
        ),
        (dict(initial_state="x"), TypeError, "state must be a LinearState"),
        (
            dict(initial_state=LinearState.zeros(2, 3, 4, 5)),
            ValueError,
            r"state.S must have shape \[B, H, Dk, Dv\] = \[2, 3, 4, 6\]",
        ),
        (
            dict(initial_state=LinearState.zeros(2, 3, 4, 6, dtype=torch.float64)),
            TypeError,
            "for torch.float32 inputs the state must be torch.float32, got torch.float64",
        ),
        (dict(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool tensor"),
        (
            dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask must have shape \[B, S\] = \[2, 5\], got \[2, 4\]",
        ),
    ],
    ids=[
        "chunk0",
        "chunk-float",
        "eps-neg",
        "eps-str",
        "backend",
        "triton-chunk",
        "state-type",
        "state-shape",
        "state-dtype",
        "mask-dtype",
        "mask-shape",
    ],
)
def test_causal_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.causal_linear_attention(*_qkv(), **kwargs)


def test_non_causal_and_softmax_and_step_reject_bad_inputs():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="linear_attention: v must have shape"):
        ops.linear_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="softmax_attention: k must have shape"):
        ops.softmax_attention(q, k[..., :2], v, causal=True)
    with pytest.raises(ValueError, match=r"linear_attention_step: q must have 3 dimensions \[B, H, Dk\]"):
        ops.linear_attention_step(q, k, v)
    with pytest.raises(ValueError, match="linear_attention_step: k must have the shape of q"):
        ops.linear_attention_step(q[:, 0], k[:, 0, :2], v[:, 0])
    with pytest.raises(ValueError, match="linear_attention_step: state.S must have shape"):
        ops.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], LinearState.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="softmax_attention_with_cache: cache must be a KVCache"):
        ops.softmax_attention_with_cache(q, k, v, cache=LinearState.zeros(2, 3, 4, 6))


def test_layer_rejects_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        AttentionLayer(30, 4)
    with pytest.raises(ValueError, match="unknown attention 'fast'"):
        AttentionLayer(32, 4, attention="fast")
    with pytest.raises(ValueError, match="unknown feature map 'gauss'; choose one of 'elu'"):
        AttentionLayer(32, 4, feature_map="gauss")
    with pytest.raises(ValueError, match="dropout must be in"):
        AttentionLayer(32, 4, dropout=1.5)
    layer = AttentionLayer(32, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\] with d_model=32, got \[2, 5, 31\]"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"x must have shape \[B, d_model\]"):
        layer.step(torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match="'linear' attention is not causal"):
        AttentionLayer(32, 4, attention="linear").step(torch.randn(2, 32))
    with pytest.raises(ValueError, match="'softmax' attention is not causal"):
        AttentionLayer(32, 4, attention="softmax")(torch.randn(2, 5, 32), return_state=True)
    # explicit per-head widths make divisibility unnecessary
    assert AttentionLayer(30, 4, d_keys=8, d_values=6)(torch.randn(1, 3, 30)).shape == (1, 3, 30)


def test_backends_are_chosen_from_what_each_record_says(monkeypatch):
    """A backend is one record (ops.backends.Backend): "auto" loops over the table asking each
    whether it takes these inputs, whether it is available and whether it was measured faster;
    a backend named is held to its own device, availability and shape rules."""
    import dataclasses

    from linear_transformers import ops
    from linear_transformers.ops.backends import BACKENDS

    q, v = torch.rand(1, 8, 2, 4), torch.rand(1, 8, 2, 4)
    chunked = BACKENDS["chunked"]
    fake = dataclasses.replace(chunked, name="fake", auto_candidate=lambda q, v: q.shape[-1] == 4, chunk=8)
    monkeypatch.setattr(ops, "BACKENDS", {"fake": fake, **BACKENDS})
    monkeypatch.setattr(ops, "_warned_fallback", set())
    assert ops._causal_backend("f", "auto", q, v).name == "fake"
    assert ops._causal_backend("f", "auto", q[..., :3], v).name != "fake"  # not a candidate: the next record's turn
    slower = dataclasses.replace(fake, auto_faster=lambda: False)
    monkeypatch.setitem(ops.BACKENDS, "fake", slower)
    assert ops._causal_backend("f", "auto", q, v).name == "chunked"
    gone = dataclasses.replace(fake, why_unavailable=lambda device: "no such device here")
    monkeypatch.setitem(ops.BACKENDS, "fake", gone)
    with pytest.warns(RuntimeWarning, match="backend 'fake' is unavailable \\(no such device here\\); using 'chunked'"):
        assert ops._causal_backend("f", "auto", q, v).name == "chunked"
    with pytest.raises(RuntimeError, match="backend 'fake' is unavailable: no such device here"):
        ops._causal_backend("f", "fake", q, v)
    with pytest.raises(ValueError, match="backend 'fake' computes in chunks of 8, not chunk_size=64"):
        ops.causal_linear_attention(q, q, v, backend="fake")
    monkeypatch.setitem(ops.BACKENDS, "fake", dataclasses.replace(fake, device_type="cuda"))
    with pytest.raises(ValueError, match="backend 'fake' runs on CUDA tensors, got tensors on cpu"):
        ops._causal_backend("f", "fake", q, v)
