"""Property-based tests (hypothesis, derandomised so every run draws the same cases): random shapes
(T = 0, 1, around the chunk, up to a few hundred), dtypes, key padding, chunk sizes from 1 to far
beyond T and states split at random points, across every CPU backend of causal linear attention,
and random small models for the fused step. Each case either equals the reference or raises
ValueError/TypeError: never a crash, never a NaN the reference does not have."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linear_transformers import decode, ops
from linear_transformers.decode import DecodeConfig, fused
from linear_transformers.model import CausalTransformer, ModelConfig
from linear_transformers.ops import LinearState, cpu

from helpers import qkv, random_state, rel_err

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ["chunked"] + (["cpu"] if cpu.available() else [])


@st.composite
def attention_cases(draw):
    chunk = draw(st.sampled_from([1, 3, 16, 64]))
    T = draw(st.one_of(st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1]), st.integers(0, 300)))
    return dict(
        B=draw(st.integers(1, 3)),
        T=max(T, 0),
        H=draw(st.integers(1, 3)),
        Dk=draw(st.integers(1, 40)),
        Dv=draw(st.integers(1, 40)),
        chunk_size=draw(st.one_of(st.just(chunk), st.integers(1, 400), st.just(2**40))),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        split=draw(st.floats(0, 1)),
        masked=draw(st.booleans()),
        with_state=draw(st.booleans()),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=attention_cases())
def test_every_cpu_backend_equals_the_reference_on_random_cases(backend, case):
    B, T, H, Dk, Dv, dtype = (case[k] for k in ("B", "T", "H", "Dk", "Dv", "dtype"))
    q, k, v = qkv(B, T, H, Dk, Dv, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = random_state(B, H, Dk, Dv, acc) if case["with_state"] else None
    mask = torch.rand(B, T) < 0.3 if case["masked"] else None
    tol = 1e-10 if dtype == torch.float64 else 3e-4
    ref, ref_state = ops.causal_linear_attention(
        q.double(),
        k.double(),
        v.double(),
        key_padding_mask=mask,
        return_state=True,
        backend="naive",
        initial_state=None if state is None else LinearState(state.S.double(), state.z.double(), state.n_tokens),
    )
    # the whole sequence at once, and split in two at a random point, the state handed over
    cut = int(case["split"] * T)
    run = dict(backend=backend, chunk_size=case["chunk_size"], return_state=True)
    out, final = ops.causal_linear_attention(q, k, v, key_padding_mask=mask, initial_state=state, **run)
    first, mid = ops.causal_linear_attention(
        q[:, :cut],
        k[:, :cut],
        v[:, :cut],
        key_padding_mask=None if mask is None else mask[:, :cut],
        initial_state=state,
        **run,
    )
    second, end = ops.causal_linear_attention(
        q[:, cut:],
        k[:, cut:],
        v[:, cut:],
        key_padding_mask=None if mask is None else mask[:, cut:],
        initial_state=mid,
        **run,
    )
    for got, got_state in ((out, final), (torch.cat([first, second], 1), end)):
        assert got.shape == ref.shape and got.dtype == dtype
        assert torch.isfinite(got).all() and torch.isfinite(got_state.S).all()
        if T:
            assert rel_err(got, ref) < tol
        assert rel_err(got_state.S, ref_state.S) < tol and rel_err(got_state.z, ref_state.z) < tol
        assert got_state.n_tokens == ref_state.n_tokens


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 3), st.integers(0, 6), st.integers(0, 6)),
    chunk_size=st.one_of(st.integers(-3, 5), st.just(2**63), st.just(1.5), st.just(True)),
    bad=st.sampled_from(["none", "state_shape", "state_dtype", "state_device", "mask_shape", "v_length"]),
)
def test_bad_inputs_raise_a_named_error_never_crash(backend, shape, chunk_size, bad):
    B, T, H, Dk, Dv = shape
    q, k, v = qkv(B, T, H, Dk, Dv, torch.float32)
    state, mask = None, None
    if bad == "state_shape":
        state = LinearState.zeros(B + 1, H, Dk, Dv, dtype=torch.float32)
    elif bad == "state_dtype":
        state = LinearState.zeros(B, H, Dk, Dv, dtype=torch.float64)
    elif bad == "state_device":
        state = LinearState(torch.zeros(B, H, Dk, Dv, device="meta"), torch.zeros(B, H, Dk, device="meta"), 0)
    elif bad == "mask_shape":
        mask = torch.zeros(B, T + 1, dtype=torch.bool)
    elif bad == "v_length":
        v = torch.randn(B, T + 1, H, Dv)
    try:
        out = ops.causal_linear_attention(
            q, k, v, initial_state=state, key_padding_mask=mask, backend=backend, chunk_size=chunk_size
        )
    except (ValueError, TypeError) as e:
        assert str(e).startswith("causal_linear_attention: "), e
        return
    # accepted: then it must be a valid call, and right
    assert bad == "none" and isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1
    assert out.shape == (B, T, H, Dv) and torch.isfinite(out).all()
    ref = ops.causal_linear_attention(q.double(), k.double(), v.double(), backend="naive")
    assert out.numel() == 0 or ((ref == 0).all() and (out == 0).all()) or rel_err(out, ref) < 3e-4


@st.composite
def model_cases(draw):
    n_heads = draw(st.integers(1, 4))
    return dict(
        d_model=n_heads * draw(st.sampled_from([1, 3, 8, 16, 17])),
        n_heads=n_heads,
        n_layers=draw(st.integers(1, 3)),
        d_ff=draw(st.integers(1, 80)),
        norm=draw(st.sampled_from(["pre", "post"])),
        feature_map=draw(st.sampled_from(["elu", "relu"])),
        positional=draw(st.sampled_from(["sinusoidal", "learned", "none"])),
        head=draw(st.sampled_from(["categorical", "mol"])),
        batch=draw(st.sampled_from([1, 2, 3, 5, 19, 20, 21, 40])),
        prompt=draw(st.integers(0, 5)),
        wrong_batch=draw(st.sampled_from([None, 0, 1, 64])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.skipif(not fused.available(), reason=f"no CPU kernel: {fused.unavailable_reason()}")
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=model_cases())
def test_the_fused_step_equals_the_pytorch_step_on_random_models(case):
    cfg = ModelConfig(
        vocab_size=16,
        max_len=24,
        d_model=case["d_model"],
        n_layers=case["n_layers"],
        n_heads=case["n_heads"],
        d_ff=case["d_ff"],
        norm=case["norm"],
        feature_map=case["feature_map"],
        positional=case["positional"],
        head=case["head"],
    )
    torch.manual_seed(case["seed"])  # (the model and tokens are part of the example: reproducible)
    model = CausalTransformer(cfg).eval()
    configs = (DecodeConfig(max_batch=64), DecodeConfig(fused=False))
    B = case["batch"]
    tokens = torch.randint(0, 16, (B, 12))
    outs = []
    with torch.no_grad():
        _, state = model.prefill(tokens[:, : case["prompt"]])
        for config in configs:
            st_ = state.clone()
            if case["wrong_batch"] is not None and case["wrong_batch"] != B:
                with pytest.raises(ValueError, match="the state's batch"):
                    model.step(torch.zeros(case["wrong_batch"], dtype=torch.long), st_, config)
            outs.append(torch.stack([model.step(tokens[:, t], st_, config)[0] for t in range(case["prompt"], 11)], 1))
        assert decode.built_step(model) is not None
    assert torch.isfinite(outs[0]).all()
    # The fused step must be as exact as PyTorch's own float32 step: both against the model in float64.
    # (A random model of width 3 can be ill-conditioned, its LayerNorm dividing by a tiny spread; there
    # both float32 paths are off float64 by 1e-5 and more, and they may differ by as much from each other.)
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        _, s64 = exact.prefill(tokens[:, : case["prompt"]])
        ref = torch.stack([exact.step(tokens[:, t], s64, configs[1])[0] for t in range(case["prompt"], 11)], 1)
    float32_error = float((outs[1].double() - ref).abs().max())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5 + 2 * float32_error, rtol=2e-5)
    assert float((outs[0].double() - ref).abs().max()) <= 2e-5 + 2 * float32_error
