"""Packed variable-length documents (cu_seqlens): on every backend, outputs, per-document final states
and all gradients equal running each document alone; lengths of 1, 0, multiples and non-multiples of
the chunk; the piece layout; the errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from linear_transformers import ops
from linear_transformers.ops import LinearState, packed
from linear_transformers.ops import triton as triton_backend

from helpers import qkv, random_state, rel_err

LENGTHS = [
    [1],
    [5, 1, 0, 70, 33, 1, 130],  # an empty document, ones, a long one
    [64, 64, 128],  # multiples of the chunk
    [300, 1, 1, 1, 17, 2],  # skewed: one long, many short
]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _weights(*tensors):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in tensors]


def _packed(backend, q, k, v, state, cu, chunk_size):
    out, final = ops.causal_linear_attention(
        q, k, v, cu_seqlens=cu, initial_state=state, return_state=True, backend=backend, chunk_size=chunk_size
    )
    return out, final.S, final.z


def _alone(q, k, v, state, cu):
    """Each document run by itself with the reference; its outputs concatenated, its state a row."""
    outs, S, z = [], [], []
    bounds = cu.tolist()
    for d, (a, b) in enumerate(itertools.pairwise(bounds)):
        s = LinearState(state.S[d : d + 1], state.z[d : d + 1])
        out, final = ops.causal_linear_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], initial_state=s, return_state=True, backend="naive"
        )
        outs.append(out)
        S.append(final.S)
        z.append(final.z)
    return torch.cat(outs, 1), torch.cat(S), torch.cat(z)


def _compare(backend, lengths, dtype, tol, chunk_size=16, H=2, Dk=8, Dv=5):
    n, T = len(lengths), sum(lengths)
    q, k, v = qkv(1, T, H, Dk, Dv, dtype, requires_grad=True)
    state = random_state(n, H, Dk, Dv, dtype, requires_grad=True)
    cu = _cu(lengths)
    got = _packed(backend, q, k, v, state, cu, chunk_size)
    ref = _alone(q, k, v, state, cu)
    w = _weights(*ref)
    inputs = [q, k, v, state.S, state.z]
    g_got = torch.autograd.grad(sum((a * b).sum() for a, b in zip(got, w, strict=True)), inputs)
    g_ref = torch.autograd.grad(sum((a * b).sum() for a, b in zip(ref, w, strict=True)), inputs)
    names = ["out", "S", "z", "dq", "dk", "dv", "dS0", "dz0"]
    for name, a, b in zip(names, [*got, *g_got], [*ref, *g_ref], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) < tol, f"{backend} {lengths} {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", ["naive", "chunked", "cpu"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "-".join(map(str, x)))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_packed_equals_each_document_alone(backend, lengths, dtype, tol):
    _compare(backend, lengths, dtype, tol)


def test_packed_on_every_isa_level(each_build):
    _compare("cpu", LENGTHS[1], torch.float64, 1e-10)


@pytest.mark.skipif(not triton_backend.available(torch.device("cpu")), reason="Triton interpreter unavailable")
def test_packed_on_triton():
    # Triton is tested in its interpreter here (float32; its chunk is 64)
    _compare("triton", [70, 1, 3, 65], torch.float32, 1e-5, chunk_size=64, H=1, Dk=16, Dv=8)


def test_bfloat16_within_twice_the_reference_error():
    lengths = [40, 3, 90]
    n, T, H, Dk, Dv = 3, 133, 2, 16, 8
    q, k, v = qkv(1, T, H, Dk, Dv, torch.float64)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    zero = LinearState.zeros(n, H, Dk, Dv, dtype=torch.bfloat16)
    ref = _alone(qb, kb, vb, zero, _cu(lengths))[0]
    got = ops.causal_linear_attention(qb, kb, vb, cu_seqlens=_cu(lengths), backend="cpu", initial_state=zero)
    exact = _alone(q, k, v, LinearState.zeros(n, H, Dk, Dv, dtype=torch.float64), _cu(lengths))[0]
    assert rel_err(got, exact) <= 2 * rel_err(ref, exact) + 1e-3


def test_no_state_and_state_without_gradients():
    lengths = [7, 20]
    q, k, v = qkv(1, 27, 2, 4, 3)
    out = ops.causal_linear_attention(q, k, v, cu_seqlens=_cu(lengths))
    ref = _alone(q, k, v, LinearState.zeros(2, 2, 4, 3, dtype=torch.float64), _cu(lengths))[0]
    assert rel_err(out, ref) < 1e-12
    _, final = ops.causal_linear_attention(q, k, v, cu_seqlens=_cu(lengths), return_state=True)
    assert final.S.shape == (2, 2, 4, 3) and final.n_tokens == 20


def test_all_documents_empty():
    q, k, v = qkv(1, 0, 2, 4, 3)
    state = random_state(2, 2, 4, 3)
    out, final = ops.causal_linear_attention(q, k, v, cu_seqlens=_cu([0, 0]), initial_state=state, return_state=True)
    assert out.shape == (1, 0, 2, 3) and torch.equal(final.S, state.S) and torch.equal(final.z, state.z)


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "-".join(map(str, x)))
def test_non_causal_packed_equals_each_document_alone(lengths):
    T = sum(lengths)
    q, k, v = qkv(1, T, 2, 6, 4, requires_grad=True)
    got = ops.linear_attention(q, k, v, cu_seqlens=_cu(lengths))
    bounds = _cu(lengths).tolist()
    ref = torch.cat([ops.linear_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(bounds)], 1)
    (w,) = _weights(ref)
    assert rel_err(got, ref) < 1e-12
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_ref, strict=True):
        assert rel_err(a, b) < 1e-12


def test_layout_puts_every_token_once_in_order():
    lengths = [5, 0, 17, 1]
    lay = packed.layout(lengths, 4, torch.device("cpu"))
    assert lay.index[lay.valid].tolist() == list(range(sum(lengths)))
    assert lay.doc.tolist() == [0, 0, 2, 2, 2, 2, 2, 3] and lay.last.tolist() == [1, -1, 6, 7] and lay.depth == 5


def test_piece_length_keeps_equal_documents_whole_and_cuts_a_long_one():
    assert packed.piece_length([100] * 50, 64, 64) == 100  # a padded batch, no padding
    P = packed.piece_length([4000] + [10] * 200, 64, 64)
    assert 16 <= P <= 64  # the long document is cut, the short ones barely padded
    assert packed.piece_length([3, 1], 64, 64) == 3


@pytest.mark.parametrize(
    "cu,match",
    [
        ([0, 5], "end at the packed length T=6"),
        ([1, 6], "start at 0"),
        ([0, 4, 2, 6], "non-decreasing; it falls from 4 to 2 at document 1"),
        ([0], "at least 2"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    q, k, v = qkv(1, 6, 1, 2, 2)
    with pytest.raises(ValueError, match=match):
        ops.causal_linear_attention(q, k, v, cu_seqlens=torch.tensor(cu))


def test_bad_packed_calls():
    q, k, v = qkv(2, 6, 1, 2, 2)
    with pytest.raises(ValueError, match="B must be 1, got B=2"):
        ops.causal_linear_attention(q, k, v, cu_seqlens=_cu([6]))
    q, k, v = qkv(1, 6, 1, 2, 2)
    with pytest.raises(TypeError, match="integer tensor"):
        ops.causal_linear_attention(q, k, v, cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match="int32/int64"):
        ops.causal_linear_attention(q, k, v, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="not both"):
        ops.causal_linear_attention(q, k, v, cu_seqlens=_cu([6]), key_padding_mask=torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"state.S must have shape \[n_documents, H, Dk, Dv\] = \[2, 1, 2, 2\]"):
        ops.causal_linear_attention(q, k, v, cu_seqlens=_cu([2, 4]), initial_state=random_state(1, 1, 2, 2))
