"""Next-token sampling in C (decode/token_sample.c) against the same rule in PyTorch
(llama.sample_tokens_reference): the same token for the same uniform draw on random logits with
ties, -inf entries, every temperature / top-k / top-p combination; the distribution it samples;
what it refuses; every ISA level and compiler."""

from __future__ import annotations

import pytest
import torch

from linear_transformers.decode import llama

from helpers import random_sampling_cases as random_cases


@pytest.fixture(autouse=True)
def _needs_the_library():
    if not llama.available():
        pytest.skip(f"the fused Llama step is not built here: {llama.unavailable_reason()}")


def check_c_equals_reference(n: int = 200, seed: int = 0) -> None:
    for logits, temperature, top_k, top_p, u in random_cases(n, seed):
        got = llama.sample_tokens(logits, temperature, top_k, top_p, u)
        want = llama.sample_tokens_reference(logits, temperature, top_k, top_p, u)
        assert torch.equal(got, want), (logits.shape, temperature, top_k, top_p, u, got, want)


def test_c_sampler_draws_the_reference_token():
    check_c_equals_reference(300, seed=1)


def test_every_build_samples_like_the_reference(each_build):
    check_c_equals_reference(60, seed=2)


def test_logits_spanning_float32s_whole_range_are_cut_like_the_reference():
    """Top-k and top-p file values into bins over [min, max]: a range too wide for float32 (the bins'
    width overflows) still gives the reference's token."""
    logits = torch.tensor([[3e38, -3e38, 1e38, 0.0, -1e38, 2e38, 5.0]])
    for top_k, top_p in [(3, 1.0), (0, 0.5), (2, 0.9)]:
        for u in (0.0, 0.5, 0.99):
            u_ = torch.tensor([u])
            want = llama.sample_tokens_reference(logits, 1.0, top_k, top_p, u_)
            assert torch.equal(llama.sample_tokens(logits, 1.0, top_k, top_p, u_), want), (top_k, top_p, u)


def test_it_samples_the_filtered_distribution():
    """Over a fine grid of u, each token's share is its probability after temperature, top-k and
    top-p, within the grid's resolution; tokens the filters drop never appear."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 1.5, -float("inf")]])
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (1.0, 5, 0.9)]:
        x = logits[0] / temperature
        keep = torch.isfinite(x)
        if top_k:
            keep &= x >= x.topk(top_k).values[-1]
        probs = torch.where(keep, x, -float("inf")).softmax(-1).double()
        if top_p < 1:
            order = probs.argsort(descending=True)
            before = probs[order].cumsum(0) - probs[order]  # the mass above each token
            drop = torch.zeros_like(keep)
            drop[order] = before >= top_p
            keep &= ~drop
            probs = torch.where(keep, probs, 0)
            probs /= probs.sum()
        got = llama.sample_tokens(logits.expand(n, -1).contiguous(), temperature, top_k, top_p, u.float())
        share = torch.bincount(got, minlength=8).double() / n
        assert (share - probs).abs().max() < 2e-3, (temperature, top_k, top_p, share, probs)
        assert share[~keep].sum() == 0


def test_greedy_is_the_first_largest_logit():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [-float("inf"), -3.0, -float("inf"), -4.0]])
    assert llama.sample_tokens(logits, 0.0).tolist() == [1, 1]
    # a temperature so small that logits overflow: its limit, the greedy token
    assert llama.sample_tokens(logits * 1e30, 1e-10, u=torch.tensor([0.3, 0.9])).tolist() == [1, 1]


def test_bad_input_is_refused_in_one_line():
    logits = torch.randn(2, 10)
    u = torch.rand(2)
    for kwargs, match in [
        (dict(temperature=-1.0), "temperature must be finite and >= 0"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            llama.sample_tokens(logits, u=u, **kwargs)
    with pytest.raises(ValueError, match=r"u must be \[B\] = \[2\]"):
        llama.sample_tokens(logits, 1.0)
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\)"):
        llama.sample_tokens(logits, 1.0, u=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="logits must be"):
        llama.sample_tokens(torch.randn(10), 1.0, u=u)
    for bad in (float("nan"), float("inf")):
        x = logits.clone()
        x[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            llama.sample_tokens(x, 1.0, u=u)
    with pytest.raises(ValueError, match="all -inf"):
        llama.sample_tokens(torch.full((2, 10), -float("inf")), 1.0, u=u)
