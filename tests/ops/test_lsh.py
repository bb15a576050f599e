"""Reformer LSH attention: the chunked implementation against the dense masked reference (the same
attended set, exactly), against softmax attention where the set is everything, and gradients."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import ops
from linear_transformers.ops import lsh, naive

from helpers import rel_err


def _inputs(B, T, H, D, Dv, dtype=torch.float64, requires_grad=False):
    qk = torch.randn(B, T, H, D, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(B, T, H, Dv, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    return qk, v


def _attended_by_loops(buckets: torch.Tensor, chunk: int, causal: bool) -> torch.Tensor:
    """The attended sets of one batch item, head and round, spelled out with Python lists."""
    T = len(buckets)
    order = sorted(range(T), key=lambda i: (int(buckets[i]), i))
    chunk_of = {pos: place // chunk for place, pos in enumerate(order)}
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if chunk_of[j] in (chunk_of[i], chunk_of[i] - 1) and (j <= i or not causal):
                out[i, j] = True
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attended_sets_match_their_definition(causal):
    buckets = torch.randint(0, 6, (2, 2, 3, 29))
    got = naive.lsh_attended(buckets, 4, causal)
    for b in range(2):
        for h in range(2):
            for r in range(3):
                assert torch.equal(got[b, h, r], _attended_by_loops(buckets[b, h, r], 4, causal))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,chunk,n_buckets", [(1, 4, 2), (29, 4, 8), (64, 8, 8), (37, 37, 4), (50, None, 8)])
def test_each_query_attends_to_exactly_its_set(causal, T, chunk, n_buckets):
    """Values = one-hot positions, so the output row is the attention distribution: its support must
    be the reference set without the query itself (unless the query is alone)."""
    H = 2
    qk = torch.randn(1, T, H, 6, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64)[None, :, None, :].expand(1, T, H, T)
    rot = lsh.random_rotations(H, 6, 1, n_buckets, dtype=torch.float64)
    weights = ops.lsh_attention(qk, v, causal=causal, n_buckets=n_buckets, chunk_size=chunk, rotations=rot)
    m = chunk or -(-T // n_buckets)
    expected = naive.lsh_attended(lsh.hash_buckets(qk, rot), m, causal)[0, :, 0]  # [H, T, T]
    eye = torch.eye(T, dtype=torch.bool)
    alone = (expected & ~eye).sum(-1, keepdim=True) == 0
    expected = (expected & ~eye) | (eye & alone)
    assert torch.equal(weights[0].permute(1, 0, 2) > 0, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, T, H, dtype=torch.float64))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("n_hashes", [1, 4])
@pytest.mark.parametrize("T", [1, 33, 100])
def test_matches_dense_reference_with_gradients(causal, n_hashes, T):
    qk, v = _inputs(2, T, 3, 8, 5, requires_grad=True)
    mask = torch.rand(2, T) < 0.2
    mask[:, 0] = False
    rot = lsh.random_rotations(3, 8, n_hashes, 8, dtype=torch.float64)
    for kpm in (None, mask):
        out = ops.lsh_attention(
            qk, v, causal=causal, n_hashes=n_hashes, n_buckets=8, chunk_size=6, key_padding_mask=kpm, rotations=rot
        )
        ref = naive.lsh_attention(qk, v, rot, causal=causal, chunk_size=6, key_padding_mask=kpm)
        keep = slice(None) if kpm is None else ~kpm  # outputs at padded queries are undefined
        assert rel_err(out[keep], ref[keep]) < 1e-12
        g = torch.randn_like(out)
        if kpm is not None:
            g[kpm] = 0
        grads = torch.autograd.grad(out, (qk, v), g)
        ref_grads = torch.autograd.grad(ref, (qk, v), g)
        for a, b in zip(grads, ref_grads, strict=True):
            assert rel_err(a, b) < 1e-10


def test_one_chunk_is_softmax_attention_without_self():
    """With every position in one chunk, LSH attention is softmax attention with the diagonal removed
    (except the first query, which has nothing else) and keys unit-normalised."""
    T, H, D = 20, 2, 8
    qk, v = _inputs(2, T, H, D, 4)
    out = ops.lsh_attention(qk, v, causal=True, n_hashes=2, n_buckets=4, chunk_size=T)
    k = qk / qk.norm(dim=-1, keepdim=True)
    scores = torch.einsum("bthd,bshd->bhts", qk, k) * D**-0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril(-1)
    allowed[0, 0] = True
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    ref = torch.einsum("bhts,bshd->bthd", p, v)
    assert rel_err(out, ref) < 1e-12


def test_rounds_combine_by_log_sum_exp():
    """Two rounds with identical rotations equal one round (equal log-sum-exp, equal outputs)."""
    qk, v = _inputs(1, 40, 2, 8, 3)
    rot1 = lsh.random_rotations(2, 8, 1, 8, dtype=torch.float64)
    one = ops.lsh_attention(qk, v, causal=True, n_buckets=8, chunk_size=5, rotations=rot1)
    two = ops.lsh_attention(
        qk, v, causal=True, n_hashes=2, n_buckets=8, chunk_size=5, rotations=rot1.repeat(1, 1, 2, 1)
    )
    assert rel_err(two, one) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    qk, v = _inputs(2, 50, 2, 16, 8)
    rot = lsh.random_rotations(2, 16, 2, 8, dtype=torch.float64)
    ref = naive.lsh_attention(qk, v, rot, causal=True, chunk_size=8)
    out = ops.lsh_attention(
        qk.to(dtype), v.to(dtype), causal=True, n_hashes=2, n_buckets=8, chunk_size=8, rotations=rot.float()
    )
    assert out.dtype == dtype
    # the buckets come from the same rotations; rounding may move a point right at a bucket border
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    same = lsh.hash_buckets(qk.to(dtype), rot.float()).eq(lsh.hash_buckets(qk, rot)).all()
    if same:
        assert rel_err(out, ref) < tol


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_padding_content_never_reaches_real_positions(causal):
    """Padded positions sort after every real one (their own bucket), so neither their values nor their
    hashes change a real position's output: padding holding zeros or noise gives the same result."""
    qk, v = _inputs(2, 40, 2, 8, 4)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[0, 25:] = True
    kpm[1, 10:14] = True
    outs = []
    for scale in (0.0, 50.0):
        qk2, v2 = qk.clone(), v.clone()
        qk2[kpm], v2[kpm] = scale * torch.randn_like(qk2[kpm]), scale * torch.randn_like(v2[kpm])
        outs.append(
            ops.lsh_attention(
                qk2,
                v2,
                causal=causal,
                n_hashes=3,
                n_buckets=4,
                key_padding_mask=kpm,
                generator=torch.Generator().manual_seed(2),
            )
        )
    assert torch.equal(outs[0][~kpm], outs[1][~kpm])
    buckets = lsh.hash_buckets(qk, lsh.random_rotations(2, 8, 3, 4, dtype=torch.float64), kpm)
    assert (buckets.permute(0, 3, 1, 2)[kpm] == 4).all() and (buckets.permute(0, 3, 1, 2)[~kpm] < 4).all()


def test_causal_output_ignores_future_values():
    """Hashing and sorting see the whole sequence (that is Reformer), but no output may depend on a
    later position's value."""
    qk, v = _inputs(1, 48, 2, 8, 4)
    out = ops.lsh_attention(qk, v, causal=True, n_hashes=2, n_buckets=4, generator=torch.Generator().manual_seed(1))
    v2 = v.clone()
    v2[:, 30:] = torch.randn_like(v2[:, 30:])
    out2 = ops.lsh_attention(qk, v2, causal=True, n_hashes=2, n_buckets=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :30], out2[:, :30])
    assert not torch.equal(out[:, 30:], out2[:, 30:])


def test_bad_input_is_named():
    qk, v = _inputs(1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="n_buckets must be even"):
        ops.lsh_attention(qk, v, causal=True, n_buckets=5)
    with pytest.raises(ValueError, match="n_hashes"):
        ops.lsh_attention(qk, v, causal=True, n_hashes=0)
    with pytest.raises(ValueError, match="qk must be"):
        ops.lsh_attention(qk[0], v, causal=True)
    with pytest.raises(ValueError, match="rotations must be"):
        ops.lsh_attention(qk, v, causal=True, rotations=torch.randn(2, 4, 1, 3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ops.lsh_attention(qk, v, causal=True, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))
