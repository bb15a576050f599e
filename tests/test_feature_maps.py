"""Feature maps: shapes, positivity, the kernels they approximate, seeding and state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch

from linear_transformers import FEATURE_MAPS, make_feature_map
from linear_transformers.feature_maps import FavorFeatureMap, RandomFourierFeatureMap, TaylorFeatureMap
from linear_transformers.ops import linear_attention

NON_NEGATIVE = ["elu", "relu", "favor", "hedgehog"]


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_shapes_and_dtypes(name):
    fm = make_feature_map(name, 8, 3)
    for lead in [(2, 5), (4,)]:
        x = torch.randn(*lead, 3, 8)
        for out in (fm.forward_queries(x), fm.forward_keys(x)):
            assert out.shape == (*lead, 3, fm.feature_dim) and out.dtype == x.dtype
            assert torch.isfinite(out).all()
    assert fm.forward_keys(torch.randn(2, 3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"expected \[..., H, D\] = \[..., 3, 8\]"):
        fm.forward_keys(torch.randn(2, 3, 7))


@pytest.mark.parametrize("name", NON_NEGATIVE)
def test_non_negative(name):
    fm = make_feature_map(name, 16, 2)
    x = 3 * torch.randn(100, 2, 16)
    assert (fm.forward_queries(x) >= 0).all() and (fm.forward_keys(x) >= 0).all()


def test_elu_is_the_papers_map():
    x = torch.randn(10, 1, 4, dtype=torch.float64)
    torch.testing.assert_close(make_feature_map("elu", 4).forward_keys(x), torch.nn.functional.elu(x) + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_elu_keeps_every_digit_of_small_features(dtype):
    """elu(x) + 1 cancels (-1 + 1) where x is very negative: float32 gives 3e-7 3% off and 2e-9 as 0,
    the size at which phi(q) . phi(k) meets eps. The map keeps full relative precision, and its
    gradients (twice) are those of elu(x) + 1."""
    x = torch.linspace(-40, 6, 4001, dtype=torch.float64).to(dtype).double()  # (exactly representable)
    exact = torch.where(x > 0, x + 1, torch.exp(x))
    got = make_feature_map("elu", 4001).forward_keys(x.to(dtype)[None])[0].double()
    tol = {torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float64: 1e-15}[dtype]  # one rounding
    assert ((got - exact).abs() / exact).max() < tol
    assert (((torch.nn.functional.elu(x.float()) + 1).double() - exact).abs() / exact).max() > 0.5  # (the bug)
    xg = (3 * torch.randn(64, 1, 8, dtype=torch.float64)).requires_grad_()
    fm = make_feature_map("elu", 8)
    assert torch.autograd.gradcheck(fm.forward_keys, (xg,)) and torch.autograd.gradgradcheck(fm.forward_keys, (xg,))
    y = fm.forward_keys(xg)
    (g,) = torch.autograd.grad(y.sum(), xg)
    torch.testing.assert_close(g, torch.where(xg > 0, 1.0, torch.exp(xg)).detach())


def test_taylor_kernel_is_exact_and_positive():
    fm = TaylorFeatureMap(6, 2)
    q, k = 2 * torch.randn(50, 2, 6, dtype=torch.float64), 2 * torch.randn(50, 2, 6, dtype=torch.float64)
    s = (q * k).sum(-1) / 6**0.5
    kernel = (fm.forward_queries(q) * fm.forward_keys(k)).sum(-1)
    torch.testing.assert_close(kernel, 1 + s + s**2 / 2)
    assert (kernel >= 0.5 - 1e-12).all()
    assert fm.feature_dim == 1 + 6 + 21


def test_favor_approximates_softmax_kernel():
    d = 16
    fm = FavorFeatureMap(d, 1, n_features=8192, seed=1)
    q, k = 0.5 * torch.randn(20, 1, d), 0.5 * torch.randn(20, 1, d)
    exact = torch.exp((q[:, None] * k[None]).sum(-1) / d**0.5)  # [20, 20, 1]
    approx = (fm.forward_keys(q)[:, None] * fm.forward_keys(k)[None]).sum(-1)
    assert ((approx - exact).abs() / exact).mean() < 0.05


def test_favor_query_stabiliser_cancels_in_attention():
    """Queries are divided by exp(max exponent); the normalised output does not change."""
    fm = FavorFeatureMap(8, 2, n_features=32, seed=3)
    q, k, v = (
        torch.randn(1, 6, 2, 8, dtype=torch.float64),
        torch.randn(1, 9, 2, 8, dtype=torch.float64),
        torch.randn(1, 9, 2, 4, dtype=torch.float64),
    )
    stabilised = linear_attention(fm.forward_queries(q), fm.forward_keys(k), v, eps=0.0)
    plain = linear_attention(fm.forward_keys(q), fm.forward_keys(k), v, eps=0.0)
    torch.testing.assert_close(stabilised, plain)


def test_fourier_approximates_gaussian_kernel():
    d = 8
    fm = RandomFourierFeatureMap(d, 1, n_features=8192, seed=2)
    q, k = 0.5 * torch.randn(20, 1, d), 0.5 * torch.randn(20, 1, d)
    exact = torch.exp(-((q[:, None] - k[None]) ** 2).sum(-1) / (2 * d**0.5))
    approx = (fm.forward_keys(q)[:, None] * fm.forward_keys(k)[None]).sum(-1)
    assert (approx - exact).abs().max() < 0.05
    sm = RandomFourierFeatureMap(d, 1, n_features=8192, seed=2, softmax=True)
    approx_sm = (sm.forward_keys(q)[:, None] * sm.forward_keys(k)[None]).sum(-1)
    exact_sm = torch.exp((q[:, None] * k[None]).sum(-1) / d**0.5)
    assert ((approx_sm - exact_sm).abs() / exact_sm).mean() < 0.05


@pytest.mark.parametrize("cls", [FavorFeatureMap, RandomFourierFeatureMap])
def test_random_maps_are_seeded_resampled_and_saved(cls):
    a, b = cls(8, 2, seed=7), cls(8, 2, seed=7)
    assert torch.equal(a.omega, b.omega)
    assert not torch.equal(a.omega, cls(8, 2, seed=8).omega)
    before = a.omega.clone()
    a.resample()
    assert not torch.equal(a.omega, before)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = cls(8, 2, seed=123)
    c.load_state_dict(torch.load(buf))
    x = torch.randn(3, 2, 8)
    assert torch.equal(c.forward_keys(x), a.forward_keys(x))
    a.resample()
    c.resample()  # the generator's state was saved too: the next draw is the same
    assert torch.equal(a.omega, c.omega)


def test_unseeded_random_maps_follow_torch_seed():
    torch.manual_seed(5)
    a = FavorFeatureMap(8, 1)
    torch.manual_seed(5)
    assert torch.equal(a.omega, FavorFeatureMap(8, 1).omega)


def test_favor_does_not_overflow_in_float16():
    fm = FavorFeatureMap(64, 1, seed=0)
    out = fm.forward_keys(8 * torch.randn(100, 1, 64, dtype=torch.float16))
    assert torch.isfinite(out).all()


def test_hedgehog_is_learnable_and_starts_from_identity():
    fm = make_feature_map("hedgehog", 4, 2)
    x = torch.randn(3, 2, 4)
    expected = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
    torch.testing.assert_close(fm.forward_keys(x), expected)
    fm.forward_keys(x).pow(2).sum().backward()
    assert fm.weight.grad is not None and fm.weight.grad.abs().sum() > 0
    assert set(dict(fm.named_parameters())) == {"weight", "bias"}


def test_lookup_errors():
    with pytest.raises(ValueError, match="unknown feature map 'nope'"):
        make_feature_map("nope", 4)
    with pytest.raises(TypeError, match="feature map 'elu'"):
        make_feature_map("elu", 4, 1, n_features=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["elu", "relu", "favor", "fourier", "hedgehog", "taylor"])
def test_no_feature_map_overflows_silently_at_large_inputs(name, dtype):
    """Inputs scaled by 1e4: every map gives finite features in the input's dtype, or (the softmax
    variant of random Fourier features, whose exp(|x|^2 / 2) has no finite value there) raises."""
    fm = make_feature_map(name, 16, 2)
    x = (1e4 * torch.randn(5, 2, 16)).to(dtype)
    for features in (fm.forward_queries(x), fm.forward_keys(x)):
        assert features.dtype == dtype and torch.isfinite(features).all(), name
    fourier = make_feature_map("fourier", 16, 2, softmax=True)
    with pytest.raises(ValueError, match=r"overflows float32 for inputs this large .* use the 'favor' map"):
        fourier.forward_keys(x)
    assert torch.isfinite(fourier.forward_keys(torch.randn(5, 2, 16).to(dtype))).all()  # ordinary inputs still work
