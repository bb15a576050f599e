"""Output heads: the distribution of the next token given the model's last hidden state.

Each head maps h [..., d_model] to parameters [..., n_params] and gives
    nll(params, targets)  negative log-likelihood in nats, [...]
    log_probs(params)     log-probabilities over the whole vocabulary, [..., vocab_size]
so training uses `nll` and `sample` draws from `log_probs` (exactly the model's distribution, for
either head). Bits per dimension = nll / ln 2, averaged over tokens (sub-pixels for images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .decode import fused


def check_sampling(fn: str, temperature: object, top_k: object, top_p: object) -> None:
    """Sampling settings a draw can honour: a finite temperature >= 0, top_k None or an int >= 1,
    top_p None or in (0, 1]. (top_p 0 or a NaN temperature would silently give token 0 everywhere.)"""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"{fn}: temperature must be a finite number >= 0 (0: the likeliest token), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{fn}: top_k must be an int >= 1 (or None: every token), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"{fn}: top_p must be in (0, 1] (1: no truncation), got {top_p!r}")


def sample(
    log_probs: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of log_probs [B, V]: temperature 0 is argmax; top_k keeps the k most
    likely tokens, top_p the smallest set whose probability reaches p (nucleus sampling)."""
    check_sampling("sample", temperature, top_k, top_p)
    if temperature == 0:
        return log_probs.argmax(-1)
    logits = log_probs / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # exponential race: argmax(logits - log E), E ~ Exp(1), draws exactly from softmax(logits)
    race = torch.empty_like(logits).exponential_(generator=generator)
    return (logits - race.log()).argmax(-1)


class CategoricalHead(nn.Module):
    """A softmax over `vocab_size` tokens."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.proj = nn.Linear(d_model, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def nll(self, params: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(params.flatten(0, -2).float(), targets.flatten(), reduction="none").view(targets.shape)

    def log_probs(self, params: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.log_softmax(params.to(dtype), dim=-1).float()

    def sample(self, params, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
        """One token per row of params [B, n_params] (see model.sample)."""
        return sample(self.log_probs(params), temperature, top_k, top_p, generator)


class MixtureOfLogisticsHead(nn.Module):
    """Discretised mixture of logistics (Salimans et al. 2017, PixelCNN++), the paper's image head.

    A token v in {0, ..., L - 1} is the value x = 2 v / (L - 1) - 1 in [-1, 1]; its probability is
    the mass that a mixture of K logistics puts on the bin [x - 1 / (L - 1), x + 1 / (L - 1)], with
    the two end bins extended to -inf and +inf, so the L probabilities sum to one exactly.
    Parameters per token: K mixture logits, K means, K log-scales.
    """

    def __init__(self, d_model: int, vocab_size: int = 256, n_components: int = 10) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"MixtureOfLogisticsHead: vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size, self.n_components = vocab_size, n_components
        self.proj = nn.Linear(d_model, 3 * n_components)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def _log_prob_of_values(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """params [..., 3K] (broadcast against) x [..., n] values in [-1, 1] -> log P [..., n]."""
        K, L = self.n_components, self.vocab_size
        params = params.float()
        logit_pi, mu, log_s = params[..., None, :K], params[..., None, K : 2 * K], params[..., None, 2 * K :]
        log_s = log_s.clamp(min=-7.0)
        x = x[..., None]  # [..., n, 1] against [..., 1, K]
        half_bin = 1.0 / (L - 1)
        centered = x - mu
        inv_s = torch.exp(-log_s)
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the lowest bin
        log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): the highest bin
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_s * centered
        # Where the bin mass underflows, the density at its centre times the bin width stands in.
        log_pdf_mid = mid_in - log_s - 2.0 * F.softplus(mid_in) + math.log(2 * half_bin)
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
        log_p = torch.where(
            x < -1 + half_bin, log_cdf_plus, torch.where(x > 1 - half_bin, log_one_minus_cdf_min, log_mid)
        )
        return torch.logsumexp(log_p + torch.log_softmax(logit_pi, dim=-1), dim=-1)

    def _values(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float() * (2.0 / (self.vocab_size - 1)) - 1.0

    def nll(self, params: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -self._log_prob_of_values(params, self._values(targets)[..., None])[..., 0]

    def log_probs(self, params: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Log-probabilities of all L levels, for sampling: each bin's probability is the difference of
        the mixture's CDF at its two edges (the outer edges at -inf and +inf), so the L probabilities
        sum to one by construction. Computed in float64 by default, so even improbable bins keep their
        log-probability (float32, for exported graphs, floors a bin's probability at float32's tiny)."""
        K, L = self.n_components, self.vocab_size
        params = params.to(dtype)  # differences of CDFs: float64 keeps improbable bins accurate
        pi = torch.softmax(params[..., :K], dim=-1)[..., None, :]
        mu, inv_s = params[..., None, K : 2 * K], torch.exp(-params[..., None, 2 * K :].clamp(min=-7.0))
        edges = torch.linspace(-1 - 1 / (L - 1), 1 + 1 / (L - 1), L + 1, device=params.device, dtype=params.dtype)
        edges = edges[1:-1, None]
        cdf = (pi * torch.sigmoid((edges - mu) * inv_s)).sum(-1)  # [..., L - 1] at the inner edges
        cdf = F.pad(F.pad(cdf, (1, 0), value=0.0), (0, 1), value=1.0)
        return torch.log((cdf[..., 1:] - cdf[..., :-1]).clamp(min=torch.finfo(dtype).tiny)).float()

    @staticmethod
    def draws_directly(temperature: float, top_k: int | None, top_p: float | None) -> bool:
        """Whether `sample` draws from the mixture itself (temperature 1, no truncation), not from
        `log_probs`: the case the fused generation runs in C (decode.fused.FusedModelStep.sample_mol)."""
        return temperature == 1.0 and not top_k and (top_p is None or top_p >= 1.0)

    # the logistic draw's uniform, kept off 0 and 1 (log u and log(1 - u) stay finite)
    UNIFORM = (1e-7, 1 - 1e-7)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None):
        """The random numbers of one direct draw for rows of `shape`, in the order `sample` takes
        them: race [*shape, K] ~ Exp(1) (which component), then u [*shape] ~ U(UNIFORM) (where in
        it). The fused generation draws through this too, so both give the same tokens."""
        race = torch.empty(*shape, self.n_components, dtype=torch.float32, device=device).exponential_(
            generator=generator
        )
        u = torch.empty(*shape, dtype=torch.float32, device=device).uniform_(*self.UNIFORM, generator=generator)
        return race, u

    def sample_drawn(self, params: torch.Tensor, race: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Levels from params [..., 3K] and one draw's random numbers (`draw`): the component
        argmax(log pi - log race), then the logistic value mu + s (log u - log(1 - u)), binned. On the
        CPU this runs in C (fused.mol_sample), the arithmetic the fused generation uses."""
        K, L = self.n_components, self.vocab_size
        params = params.float()
        if params.device.type == "cpu" and params.dim() == 2 and fused.available():
            return fused.mol_sample(params.contiguous(), race.contiguous(), u.contiguous(), L)
        k = (torch.log_softmax(params[..., :K], -1) - race.log()).argmax(-1, keepdim=True)
        mu = params[..., K : 2 * K].gather(-1, k)[..., 0]
        s = torch.exp(params[..., 2 * K :].clamp(min=-7.0).gather(-1, k)[..., 0])
        x = mu + s * (torch.log(u) - torch.log1p(-u))
        return torch.round((x + 1) * ((L - 1) / 2)).clamp(0, L - 1).long()

    def sample(self, params, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
        """One level per row of params [B, 3K]. At temperature 1 without truncation, draw a component,
        then a logistic value, and bin it (`draw`, `sample_drawn`): exactly the discretised mixture,
        without evaluating all L levels. Otherwise sample from `log_probs` (tempered, truncated)."""
        check_sampling("sample", temperature, top_k, top_p)
        if not self.draws_directly(temperature, top_k, top_p):
            return sample(self.log_probs(params), temperature, top_k, top_p, generator)
        return self.sample_drawn(params, *self.draw(params.shape[:-1], generator, params.device))


HEADS = {"categorical": CategoricalHead, "mol": MixtureOfLogisticsHead}
