"""Feature maps phi for linear attention: sim(q, k) = phi(q) . phi(k).

Every map is an `nn.Module` taking [..., H, D] (any leading dims, heads second to last) to
[..., H, feature_dim]. `forward_queries` and `forward_keys` may differ (asymmetric maps such as
FAVOR+ stabilise queries and keys differently). Random maps draw their projections from a seeded
generator and keep them as buffers, so a saved model reloads the same features; `resample()` draws
new ones. Maps are looked up by name in `FEATURE_MAPS`:

    "elu"       elu(x) + 1, the paper's map (default)
    "relu"      relu(x)
    "favor"     FAVOR+ positive orthogonal random features for the softmax kernel (Performer)
    "fourier"   random Fourier features for the Gaussian kernel (Rahimi & Recht)
    "hedgehog"  learnable per-head map [softmax(xW + b), softmax(-(xW + b))] (Hedgehog)
    "taylor"    2nd-order Taylor expansion of exp(q.k / sqrt(D)) (Based)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureMap(nn.Module):
    """Base class. Subclasses set `feature_dim` and implement `forward_keys` (and `forward_queries`
    when queries are mapped differently). `non_negative`: phi(q) . phi(k) >= 0 for all inputs, so
    that the normaliser of causal attention (phi(q) . the running sum of phi(k)) cannot reach zero
    from below; causal linear attention refuses maps without it."""

    non_negative = True

    def __init__(self, head_dim: int, n_heads: int = 1) -> None:
        super().__init__()
        if head_dim < 1 or n_heads < 1:
            raise ValueError(f"{type(self).__name__}: head_dim and n_heads must be >= 1, got {head_dim}, {n_heads}")
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.feature_dim = head_dim

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_keys(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The key map; use `forward_queries` for queries."""
        return self.forward_keys(x)

    def resample(self) -> None:
        """Draw new random features (no-op for deterministic maps)."""

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.head_dim or x.shape[-2] != self.n_heads:
            raise ValueError(
                f"{type(self).__name__}: expected [..., H, D] = [..., {self.n_heads}, {self.head_dim}], "
                f"got {list(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, n_heads={self.n_heads}, feature_dim={self.feature_dim}"


class _EluPlusOne(torch.autograd.Function):
    """elu(x) + 1 to full relative precision: exp(x) at and below 0, x + 1 above. Written as
    elu(x) + 1 it cancels (-1 + 1): in float32 a feature of 3e-7 comes out 3% off and one of 2e-9
    as 0, exactly the size at which phi(q) . phi(k) meets the normaliser's eps, so a trained model
    whose first tokens have such features gave logits that differed by 0.6 between float32 and
    float64, and between PyTorch and onnxruntime. The backward reads the output alone:
    d phi / dx = min(phi, 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clamp(max=0).exp_().add_(F.relu(x))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * y.clamp(max=1)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, computed without cancellation (_EluPlusOne); differentiable twice."""
    return _EluPlusOne.apply(x)


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 (paper Eq. 7): positive, so the normaliser is positive."""

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return elu_plus_one(x)


class ReluFeatureMap(FeatureMap):
    """phi(x) = relu(x). Non-negative; a query whose features are all zero gets a zero output."""

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return F.relu(x)


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def _clamp_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 features to `dtype`, saturating instead of overflowing to +-inf (float16)."""
    if dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        x = x.clamp(min=-big, max=big)
    return x.to(dtype)


class _RandomProjection(FeatureMap):
    """Shared machinery: a [head_dim, n_projections] projection buffer drawn from a seeded generator."""

    def __init__(self, head_dim: int, n_heads: int, n_projections: int, seed: int | None) -> None:
        super().__init__(head_dim, n_heads)
        if n_projections < 1:
            raise ValueError(f"{type(self).__name__}: n_features must be >= 1, got {n_projections}")
        self.n_projections = n_projections
        self._gen = _generator(seed)
        self.register_buffer("omega", torch.empty(head_dim, n_projections))
        self.resample()

    def _draw(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def resample(self) -> None:
        self.omega.copy_(self._draw().to(self.omega.device))

    # The generator's state travels in the state_dict too, so resampling after a reload continues
    # the same sequence of draws.
    def get_extra_state(self) -> torch.Tensor:
        return self._gen.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._gen.set_state(state.cpu())

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x / D^(1/4), its projection), float32. The scaling makes q.k pick up the softmax's 1/sqrt(D)."""
        self._check(x)
        x = x.float() * self.head_dim**-0.25
        return x, x @ self.omega.float()


class FavorFeatureMap(_RandomProjection):
    """FAVOR+ (Choromanski et al. 2021): positive orthogonal random features with
    E[phi(q) . phi(k)] = exp(q . k / sqrt(D)), the softmax kernel.

    phi(x) = exp(w_i^T x - |x|^2 / 2) / sqrt(m) with x = x / D^(1/4) and orthogonal w_i (blocks of
    D orthogonal rows, each scaled to a chi-distributed norm). Queries are stabilised by their own
    maximum exponent, which cancels exactly in the normalised output; keys cannot be (in causal
    attention no global maximum over keys exists), so they are computed in float32.
    """

    def __init__(self, head_dim: int, n_heads: int = 1, n_features: int | None = None, seed: int | None = None):
        super().__init__(head_dim, n_heads, n_features or head_dim, seed)
        self.feature_dim = self.n_projections

    def _draw(self) -> torch.Tensor:
        d, m = self.head_dim, self.n_projections
        blocks = []
        for _ in range(math.ceil(m / d)):
            g = torch.randn(d, d, generator=self._gen)
            q, _ = torch.linalg.qr(g)
            blocks.append(q.T)  # rows orthonormal
        w = torch.cat(blocks)[:m]  # [m, d]
        norms = torch.randn(m, d, generator=self._gen).norm(dim=1, keepdim=True)
        return (w * norms).T.contiguous()  # [d, m]

    def _features(self, x: torch.Tensor, stabilise: bool) -> torch.Tensor:
        dtype = x.dtype
        xs, u = self._project(x)
        u = u - 0.5 * (xs * xs).sum(-1, keepdim=True)
        if stabilise:
            u = u - u.amax(-1, keepdim=True).detach()
        return _clamp_to(torch.exp(u) * self.n_projections**-0.5, dtype)

    def forward_queries(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, stabilise=True)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, stabilise=False)


class RandomFourierFeatureMap(_RandomProjection):
    """Random Fourier features (Rahimi & Recht 2007) for the Gaussian kernel:
    E[phi(q) . phi(k)] = exp(-|q - k|^2 / (2 sqrt(D))), phi(x) = [cos(Wx), sin(Wx)] / sqrt(m), W ~ N(0, I).

    With `softmax=True` the features are multiplied by exp(|x|^2 / (2 sqrt(D))), which turns the
    kernel into the softmax kernel exp(q . k / sqrt(D)). The estimate is unbiased but not
    non-negative: the normaliser can come out near zero or negative, so prefer "elu" or "favor" for
    training; this map is here for the comparisons.
    """

    non_negative = False  # cos and sin features: the normaliser can cross zero

    def __init__(
        self,
        head_dim: int,
        n_heads: int = 1,
        n_features: int | None = None,
        seed: int | None = None,
        softmax: bool = False,
    ) -> None:
        super().__init__(head_dim, n_heads, n_features or head_dim, seed)
        self.softmax = softmax
        self.feature_dim = 2 * self.n_projections

    def _draw(self) -> torch.Tensor:
        return torch.randn(self.head_dim, self.n_projections, generator=self._gen)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xs, u = self._project(x)
        phi = torch.cat([torch.cos(u), torch.sin(u)], dim=-1) * self.n_projections**-0.5
        if self.softmax:
            sq = (xs * xs).sum(-1, keepdim=True)
            if not torch.compiler.is_compiling() and not bool(sq.max() < 170.0):  # exp(85) ~ 8e36: float32's edge
                raise ValueError(
                    f"RandomFourierFeatureMap(softmax=True): exp(|x|^2 / (2 sqrt(D))) overflows float32 for inputs "
                    f"this large (|x|^2 / sqrt(D) up to {sq.max().item():.3g}, above 170); normalise the inputs "
                    "or use the 'favor' map, whose features are stabilised"
                )
            phi = phi * torch.exp(0.5 * sq)
        return _clamp_to(phi, dtype)


class HedgehogFeatureMap(FeatureMap):
    """Learnable Hedgehog map (Zhang et al. 2024): per head, u = x W_h + b_h and
    phi(x) = [softmax(u), softmax(-u)] (2 * n_features non-negative features summing to 2).

    W_h starts as the identity (when n_features == head_dim) so training starts from
    phi(x) = [softmax(x), softmax(-x)]; the weights are parameters and train with the model.
    """

    def __init__(self, head_dim: int, n_heads: int = 1, n_features: int | None = None) -> None:
        super().__init__(head_dim, n_heads)
        m = n_features or head_dim
        self.feature_dim = 2 * m
        weight = torch.zeros(n_heads, head_dim, m)
        if m == head_dim:
            weight[:] = torch.eye(head_dim)
        else:
            nn.init.xavier_uniform_(weight)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(n_heads, m))

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        u = torch.einsum("...hd,hdm->...hm", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)


class TaylorFeatureMap(FeatureMap):
    """Second-order Taylor map (Based, Arora et al. 2024):
    phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(D), which is >= 1/2 > 0 for every s.

    phi(x) = [1, x', x'_i x'_j (i <= j, off-diagonal terms times sqrt(2)) / sqrt(2)] with x' = x / D^(1/4):
    the symmetric square is stored once, 1 + D + D (D + 1) / 2 features (153 for D = 16).
    """

    def __init__(self, head_dim: int, n_heads: int = 1) -> None:
        super().__init__(head_dim, n_heads)
        i, j = torch.triu_indices(head_dim, head_dim)
        self.register_buffer("_i", i, persistent=False)
        self.register_buffer("_j", j, persistent=False)
        self.register_buffer("_diagonal", i == j, persistent=False)
        self.feature_dim = 1 + head_dim + len(i)

    def forward_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Computed in float32 for half-precision inputs (the squares of float16 values above 256
        overflow), the result saturated to the input's dtype instead of becoming inf."""
        self._check(x)
        dtype = x.dtype
        x = (x.float() if dtype in (torch.float16, torch.bfloat16) else x) * self.head_dim**-0.25
        # x_i x_j / sqrt(2) on the diagonal, x_i x_j off it (sqrt(2) for the two symmetric terms / sqrt(2))
        scale = self._diagonal.to(x.dtype) * (math.sqrt(0.5) - 1) + 1
        second = x[..., self._i] * x[..., self._j] * scale
        phi = torch.cat([torch.ones_like(x[..., :1]), x, second], dim=-1)
        return _clamp_to(phi, dtype) if dtype != x.dtype else phi


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "favor": FavorFeatureMap,
    "fourier": RandomFourierFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "taylor": TaylorFeatureMap,
}


def make_feature_map(name: str, head_dim: int, n_heads: int = 1, **kwargs) -> FeatureMap:
    """Build the feature map called `name` (see FEATURE_MAPS) for heads of `head_dim` dimensions."""
    try:
        cls = FEATURE_MAPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(map(repr, FEATURE_MAPS))}") from None
    try:
        return cls(head_dim, n_heads, **kwargs)
    except TypeError as e:
        raise TypeError(f"feature map {name!r}: {e}") from None
