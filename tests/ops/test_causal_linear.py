"""causal_linear_attention: every backend against the naive reference (outputs, final states and all
gradients), the registered operators under gradcheck and opcheck, parallel == recurrent, resuming, padding
and low precision."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import ops
from linear_transformers.ops import LinearState, chunked, naive

from helpers import qkv, random_state, rel_err, shape_id

FAST_BACKENDS = ["chunked", "cpu"]

SHAPES = [
    dict(B=2, T=1, H=3, Dk=16, Dv=8),
    dict(B=2, T=63, H=3, Dk=16, Dv=8),
    dict(B=2, T=64, H=3, Dk=16, Dv=8),
    dict(B=2, T=65, H=3, Dk=16, Dv=8),
    dict(B=1, T=1000, H=2, Dk=12, Dv=20),
]


@pytest.fixture(params=["default", "small-blocks-3-threads"])
def block_size(request, monkeypatch):
    """The chunked path walks the sequence in blocks of chunks: also force tiny blocks so the state is
    carried across many of them. The CPU kernel splits the sequences over threads: also use 3 threads,
    so the split is uneven and a thread may get none."""
    if request.param != "default":
        monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(3)
        yield request.param
        torch.set_num_threads(threads)
    else:
        yield request.param


def _run(backend, q, k, v, state, chunk_size=64):
    out, final = ops.causal_linear_attention(
        q, k, v, initial_state=state, return_state=True, backend=backend, chunk_size=chunk_size
    )
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    w_S = torch.randn(final.S.shape, generator=g, dtype=torch.float64).to(final.S.dtype)
    w_z = torch.randn(final.z.shape, generator=g, dtype=torch.float64).to(final.z.dtype)
    loss = (out * w_out).sum() + (final.S * w_S).sum() + (final.z * w_z).sum()
    result = {"out": out, "S": final.S, "z": final.z, "n_tokens": final.n_tokens}
    inputs = {"dq": q, "dk": k, "dv": v, "dS0": state.S, "dz0": state.z}
    names = [name for name, t in inputs.items() if t.requires_grad]
    result.update(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names]), strict=True))
    return result


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(**s))
def test_backend_matches_naive(backend, dtype, tol, shape, block_size):
    B, T, H, Dk, Dv = shape["B"], shape["T"], shape["H"], shape["Dk"], shape["Dv"]
    q, k, v = qkv(B, T, H, Dk, Dv, dtype, requires_grad=True)
    state = random_state(B, H, Dk, Dv, dtype, requires_grad=True)
    ref = _run("naive", q, k, v, state)
    got = _run(backend, q, k, v, state)
    assert got["n_tokens"] == ref["n_tokens"] == T + state.n_tokens
    for name in ["out", "S", "z", "dq", "dk", "dv", "dS0", "dz0"]:
        assert got[name].dtype == ref[name].dtype, name
        assert got[name].shape == ref[name].shape, name
        assert rel_err(got[name], ref[name]) < tol, f"{name}: {rel_err(got[name], ref[name]):.2e}"


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 128])
def test_chunk_sizes(chunk_size, block_size):
    q, k, v = qkv(2, 45, 2, 5, 3, requires_grad=True)
    state = random_state(2, 2, 5, 3, requires_grad=True)
    ref = _run("naive", q, k, v, state)
    got = _run("chunked", q, k, v, state, chunk_size=chunk_size)
    for name in ["out", "S", "z", "dq", "dk", "dv", "dS0", "dz0"]:
        assert rel_err(got[name], ref[name]) < 1e-10, name


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck_through_the_registered_operator(backend, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 1)  # several blocks: the carried state is differentiated too
    q, k, v = qkv(2, 11, 2, 3, 4, requires_grad=True)
    state = random_state(2, 2, 3, 4, requires_grad=True)

    def f(q, k, v, S0, z0):
        out, final = ops.causal_linear_attention(
            q, k, v, initial_state=LinearState(S0, z0), return_state=True, backend=backend, chunk_size=4
        )
        return out, final.S, final.z

    assert torch.autograd.gradcheck(f, (q, k, v, state.S, state.z))


def test_operators_are_registered_with_fake_implementations():
    from torch.library import opcheck

    q, k, v = qkv(1, 10, 2, 4, 3, torch.float32, requires_grad=True)
    S0, z0 = torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4)
    for backend in FAST_BACKENDS:
        op = torch.ops.linear_transformers.causal_linear_attention_fwd.default
        opcheck(op, (q, k, v, S0, z0, 1e-6, 4, backend, True))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_eager_path_equals_the_registered_operators(backend):
    """Outside torch.compile the layer calls the backend through EagerCausalLinearAttention, not
    the operators: outputs, final states and all gradients are the same, bit for bit."""
    from linear_transformers.ops import library

    q, k, v = qkv(2, 70, 2, 8, 6, torch.float32, requires_grad=True)
    state = random_state(2, 2, 8, 6, torch.float32)
    S0, z0 = state.S.requires_grad_(), state.z.requires_grad_()
    w = [torch.randn(2, 70, 2, 6), torch.randn(2, 2, 8, 6), torch.randn(2, 2, 8)]

    def run(fn):
        y, S, z = fn()[:3]
        loss = (y * w[0]).sum() + (S * w[1]).sum() + (z * w[2]).sum()
        return [y, S, z, *torch.autograd.grad(loss, (q, k, v, S0, z0))]

    op = torch.ops.linear_transformers.causal_linear_attention_fwd
    via_op = run(lambda: op(q, k, v, S0, z0, 1e-6, 16, backend, True))
    eager = run(lambda: library.EagerCausalLinearAttention.apply(q, k, v, S0, z0, 1e-6, 16, backend))
    public = ops.causal_linear_attention(q, k, v, initial_state=state, chunk_size=16, backend=backend)
    for a, b in zip(eager, via_op, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(public, via_op[0])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_inputs(backend):
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in qkv(2, 40, 3, 8, 8))
    assert not q.is_contiguous()
    state = random_state(2, 3, 8, 8)
    ref = _run("naive", q, k, v, state)
    got = _run(backend, q, k, v, state)
    for name in ["out", "S", "dq", "dk", "dv"]:
        assert rel_err(got[name], ref[name]) < 1e-10, name


def test_gradients_only_for_what_requires_them():
    q, k, v = qkv(1, 20, 2, 4, 4)
    q.requires_grad_(True)
    out = ops.causal_linear_attention(q, k, v, backend="chunked", chunk_size=8)
    (dq,) = torch.autograd.grad(out.sum(), [q])
    ref = torch.autograd.grad(ops.causal_linear_attention(q, k, v, backend="naive").sum(), [q])[0]
    assert rel_err(dq, ref) < 1e-10


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_parallel_equals_token_by_token_step(backend):
    B, T, H, Dk, Dv = 2, 70, 3, 6, 5
    q, k, v = qkv(B, T, H, Dk, Dv)
    init = random_state(B, H, Dk, Dv)
    out, final = ops.causal_linear_attention(
        q, k, v, initial_state=init, return_state=True, backend=backend, chunk_size=16
    )
    state = init.clone()
    steps = []
    for t in range(T):
        o, state = ops.linear_attention_step(q[:, t], k[:, t], v[:, t], state)
        steps.append(o)
    assert rel_err(torch.stack(steps, 1), out) < 1e-10
    assert rel_err(state.S, final.S) < 1e-10 and rel_err(state.z, final.z) < 1e-10
    assert state.n_tokens == final.n_tokens == init.n_tokens + T
    loop_out, loop_state = naive.causal_linear_attention_recurrent(q, k, v, initial_state=init)
    assert rel_err(loop_out, out) < 1e-10 and rel_err(loop_state.S, final.S) < 1e-10


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
@pytest.mark.parametrize("split", [1, 17, 64, 99])
def test_split_and_resume_equals_whole(backend, split):
    q, k, v = qkv(2, 100, 2, 8, 4)
    whole, whole_state = ops.causal_linear_attention(q, k, v, return_state=True, backend=backend, chunk_size=16)
    first, state = ops.causal_linear_attention(
        q[:, :split], k[:, :split], v[:, :split], return_state=True, backend=backend, chunk_size=16
    )
    second, final = ops.causal_linear_attention(
        q[:, split:],
        k[:, split:],
        v[:, split:],
        initial_state=state,
        return_state=True,
        backend=backend,
        chunk_size=16,
    )
    assert rel_err(torch.cat([first, second], 1), whole) < 1e-10
    assert rel_err(final.S, whole_state.S) < 1e-10 and rel_err(final.z, whole_state.z) < 1e-10
    assert final.n_tokens == 100


@pytest.mark.parametrize("backend", ["naive", *FAST_BACKENDS])
def test_padded_keys_change_nothing(backend):
    B, T, P, H, D = 2, 30, 9, 2, 6
    q, k, v = qkv(B, T, H, D, D)
    ref, ref_state = ops.causal_linear_attention(q, k, v, return_state=True, backend=backend, chunk_size=8)
    # Left-pad with P garbage tokens (large values, so any leak into numerator or normaliser shows).
    pq, pk, pv = (torch.cat([100 * torch.rand(B, P, H, x.shape[-1], dtype=x.dtype), x], 1) for x in (q, k, v))
    mask = torch.zeros(B, P + T, dtype=torch.bool)
    mask[:, :P] = True
    out, state = ops.causal_linear_attention(
        pq, pk, pv, key_padding_mask=mask, return_state=True, backend=backend, chunk_size=8
    )
    assert rel_err(out[:, P:], ref) < 1e-10
    assert rel_err(state.S, ref_state.S) < 1e-10 and rel_err(state.z, ref_state.z) < 1e-10
    assert torch.isfinite(out).all()
    # Padding interleaved per sequence: row 0 pads position 3, row 1 nothing.
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3] = True
    out = ops.causal_linear_attention(q, k, v, key_padding_mask=mask, backend=backend, chunk_size=8)
    keep = torch.tensor([i for i in range(T) if i != 3])
    ref0 = ops.causal_linear_attention(q[:1, keep], k[:1, keep], v[:1, keep], backend=backend, chunk_size=8)
    assert rel_err(out[:1, keep], ref0) < 1e-10
    assert rel_err(out[1:], ref[1:]) < 1e-10


def test_empty_sequence_returns_initial_state():
    q, k, v = qkv(2, 0, 2, 4, 3)
    init = random_state(2, 2, 4, 3)
    for backend in ["naive", *FAST_BACKENDS]:
        out, state = ops.causal_linear_attention(q, k, v, initial_state=init, return_state=True, backend=backend)
        assert out.shape == (2, 0, 2, 3)
        assert torch.equal(state.S, init.S) and state.n_tokens == init.n_tokens


def test_state_is_float32_for_half_inputs_and_float64_for_float64():
    for dtype, acc in [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        q, k, v = qkv(1, 10, 2, 4, 4, dtype)
        out, state = ops.causal_linear_attention(q, k, v, return_state=True)
        assert out.dtype == dtype and state.S.dtype == acc and state.z.dtype == acc


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_error_at_most_twice_the_reference(backend, dtype):
    """Error against the float64 reference is at most 2x the naive reference's own error in that dtype."""
    B, T, H, Dk, Dv = 2, 300, 2, 16, 8
    q, k, v = qkv(B, T, H, Dk, Dv, dtype, requires_grad=True)
    exact = _run(
        "naive",
        *(x.detach().double().requires_grad_() for x in (q, k, v)),
        LinearState.zeros(B, H, Dk, Dv, dtype=torch.float64).detach(),
    )
    state = LinearState.zeros(B, H, Dk, Dv, dtype=dtype)
    ref = _run("naive", q, k, v, state)
    got = _run(backend, q, k, v, state)
    for name in ["out", "S", "z", "dq", "dk", "dv"]:
        err_ref, err_got = rel_err(ref[name], exact[name]), rel_err(got[name], exact[name])
        assert got[name].dtype == ref[name].dtype
        assert err_got <= 2 * err_ref + 1e-7, f"{name}: {err_got:.2e} vs reference {err_ref:.2e}"


def test_bfloat16_100k_tokens_stays_finite():
    q, k, v = qkv(1, 100_000, 2, 16, 16, torch.bfloat16, requires_grad=True)
    out, state = ops.causal_linear_attention(q, k, v, return_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(state.S).all() and torch.isfinite(state.z).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    # The end of the sequence still matches the float64 recurrence started from the exact prefix state.
    with torch.no_grad():
        _, prefix = ops.causal_linear_attention(
            q[:, :-50].double(), k[:, :-50].double(), v[:, :-50].double(), return_state=True
        )
        tail, _ = naive.causal_linear_attention_recurrent(
            q[:, -50:].double(), k[:, -50:].double(), v[:, -50:].double(), initial_state=prefix
        )
    assert rel_err(out[:, -50:], tail) < 2e-2


def test_non_causal_linear_attention_matches_naive():
    q, k, v = qkv(2, 37, 3, 7, 5, requires_grad=True, S=52)
    mask = torch.rand(2, 52) < 0.3
    for m in [None, mask]:
        out = ops.linear_attention(q, k, v, key_padding_mask=m)
        ref = naive.linear_attention(q, k, v, key_padding_mask=m)
        assert out.shape == (2, 37, 3, 5)
        assert rel_err(out, ref) < 1e-10
        g = torch.autograd.grad(out.square().sum(), (q, k, v))
        g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(g, g_ref, strict=True):
            assert rel_err(a, b) < 1e-10


def test_non_causal_padding_invariance():
    q, k, v = qkv(1, 10, 2, 4, 4, S=12)
    extra_k, extra_v = 50 * torch.rand(1, 5, 2, 4, dtype=k.dtype), 50 * torch.randn(1, 5, 2, 4, dtype=v.dtype)
    mask = torch.zeros(1, 17, dtype=torch.bool)
    mask[:, 12:] = True
    out = ops.linear_attention(q, torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1), key_padding_mask=mask)
    assert rel_err(out, ops.linear_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize("backend", ["naive", "chunked", "cpu"])
def test_under_bfloat16_autocast_every_backend_takes_its_inputs_dtype(backend):
    """Inside torch.autocast (bf16 training) the op runs as it does outside on the same bf16 inputs:
    autocast must not reach into a backend ("chunked" got bfloat16 products into its float32
    accumulators and failed), forward and backward."""
    if backend == "cpu" and not ops.cpu.available():
        pytest.skip(ops.cpu.unavailable_reason())
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.rand(2, 70, 3, 8, generator=g) + 0.1).bfloat16().requires_grad_() for _ in range(2))
    v = torch.randn(2, 70, 3, 8, generator=g).bfloat16().requires_grad_()
    w = torch.randn(2, 70, 3, 8, generator=g)
    plain = ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=16)
    g_plain = torch.autograd.grad((plain.float() * w).sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=16)
    g_auto = torch.autograd.grad((out.float() * w).sum(), (q, k, v))  # (backward outside, as PyTorch advises)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)
    for a, b in zip(g_auto, g_plain, strict=True):
        assert torch.equal(a, b)
    if backend != "naive":  # a kernel's own backward, called inside the block, is not autocast either
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=16)
            g_inside = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
        for a, b in zip(g_inside, g_plain, strict=True):
            assert torch.equal(a, b)


def test_non_causal_linear_attention_sums_in_float32_under_autocast():
    """Inside a bfloat16 autocast the non-causal op still sums in float32 (its einsums would
    otherwise run in bfloat16): the same output as outside autocast, packed or not."""
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.rand(1, 300, 2, 8, generator=g) + 0.1).bfloat16() for _ in range(2))
    v = torch.randn(1, 300, 2, 8, generator=g).bfloat16()
    cu = torch.tensor([0, 100, 300])
    for kwargs in ({}, {"cu_seqlens": cu}):
        plain = ops.linear_attention(q, k, v, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ops.linear_attention(q, k, v, **kwargs), plain)
