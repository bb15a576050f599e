"""Converting a pretrained `transformers` causal LM with Llama-style attention (Llama; Mistral and
Qwen2 share its attention module's shape) into linear attention: each softmax attention module is
replaced by `LinearizedAttention`, which keeps its projections, RoPE and grouped key/value heads and
adds learned feature maps (and, in the hybrid, a sliding window with attention sinks).

    model = AutoModelForCausalLM.from_pretrained(...)
    linearize(model, LinearizeConfig(mode="hybrid", window=64, sinks=4))   # in place
    model(input_ids).logits                      # the parallel form (training, prefill)

Tested with Llama (SmolLM2-135M and tiny random configs), Mistral and Qwen2 (tiny random configs:
recurrent = parallel, and the fused C step = the PyTorch step).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

from .attention import (
    FEATURE_MAPS,
    MODES,
    HybridState,
    documents_of,
    hybrid_attention,
    linear_attention,
    make_feature_map,
)
from .attention import step_attention as _step


@dataclass
class LinearizeConfig:
    """How each softmax attention becomes linear."""

    mode: str = "hybrid"  # "linear" (pure), "hybrid" (window + sinks + linear), "window" (window + sinks alone)
    feature_map: str = "hedgehog"  # "hedgehog" (learned, per head), "elu", "relu"
    window: int = 64  # the softmax window of "hybrid" and "window"
    sinks: int = 4  # the first tokens every position keeps attending to (attention sinks)
    eps: float = 1e-6  # normaliser epsilon
    backend: str = "auto"  # the ops backend of the pure linear form

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LinearizeConfig: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"LinearizeConfig: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {self.feature_map!r}"
            )
        if self.window < 1 or self.sinks < 0:
            raise ValueError(f"LinearizeConfig: window must be >= 1 and sinks >= 0, got {self.window}, {self.sinks}")
        if not 0 <= self.eps < float("inf"):
            raise ValueError(f"LinearizeConfig: eps must be a finite number >= 0, got {self.eps}")

    def to_dict(self) -> dict:
        return asdict(self)


def _rope(q, k, cos, sin):
    """RoPE as transformers' Llama applies it (rotate_half), on [B, T, H, D] with cos/sin [B, T, D]."""

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos[:, :, None], sin[:, :, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LinearizedAttention(nn.Module):
    """A drop-in for a Llama-style attention module: the same q/k/v/o projections (taken over, not
    copied), linear or hybrid attention instead of softmax. forward(hidden_states,
    position_embeddings, attention_mask=None, cache=None, **kwargs) -> (output, None) as the
    module it replaces; with `cache` (a LinearizedCache) it steps recurrently, token by token."""

    def __init__(self, softmax_attention: nn.Module, cfg: LinearizeConfig, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = getattr(softmax_attention, "layer_idx", 0)
        self.head_dim = softmax_attention.head_dim
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.groups = n_heads // n_kv_heads  # query heads per key/value head
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, getattr(softmax_attention, name))
        self.feature_map_q = make_feature_map(cfg.feature_map, n_heads, self.head_dim)
        self.feature_map_k = make_feature_map(cfg.feature_map, n_heads, self.head_dim)

    def project(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
        """q [B, T, H, D], k and v [B, T, H, D] (repeated over the query heads), after RoPE."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.n_kv_heads, self.head_dim)
        cos, sin = position_embeddings
        q, k = _rope(q, k, cos, sin)
        if self.groups > 1:
            k, v = k.repeat_interleave(self.groups, dim=2), v.repeat_interleave(self.groups, dim=2)
        return q, k, v

    def attend(self, q, k, v, start: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """The parallel form over q, k, v [B, T, H, D] -> [B, T, H, D]; start [B]: where each row's
        tokens begin (left padding before it: no key there is seen, its outputs are 0); cu_seqlens
        (documents_of): packed documents, each attending only to itself, sinks and all."""
        cfg = self.cfg
        if cfg.mode == "linear":
            fk = self.feature_map_k(k)
            if start is not None:
                fk = fk * (torch.arange(k.shape[1], device=k.device) >= start[:, None].to(k.device))[..., None, None]
            return linear_attention(self.feature_map_q(q), fk, v, cfg.eps, cfg.backend, cu_seqlens)
        fq = fk = None
        if cfg.mode == "hybrid":
            fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        if cu_seqlens is None:
            return hybrid_attention(q, k, v, fq, fk, cfg.window, cfg.sinks, cfg.eps, start)
        # packed: each document through the banded form alone (its own window, sinks and state)
        B, T = q.shape[:2]
        cut = lambda x, a, b: None if x is None else x.reshape(1, B * T, *x.shape[2:])[:, a:b]  # noqa: E731
        edges = cu_seqlens.tolist()
        parts = [
            hybrid_attention(
                cut(q, a, b), cut(k, a, b), cut(v, a, b), cut(fq, a, b), cut(fk, a, b), cfg.window, cfg.sinks, cfg.eps
            )
            for a, b in itertools.pairwise(edges)
        ]
        return torch.cat(parts, dim=1).view(*q.shape[:3], v.shape[-1])

    def new_state(self, q: torch.Tensor) -> HybridState:
        B = q.shape[0]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        F = self.feature_map_k(q[:, :1]).shape[-1]
        S = q.new_zeros(B, self.n_heads, F, self.head_dim, dtype=acc)
        return HybridState(S, q.new_zeros(B, self.n_heads, F, dtype=acc))

    def prefill_state(self, q, k, v, start: torch.Tensor | None = None) -> HybridState:
        """The recurrent state after the tokens q, k, v [B, T, H, D] (what T steps from an empty
        state leave), computed in one pass: the keys that left the window (and are no sinks) summed
        into S and z, the last `window` keys and values in their ring slots, the sinks'. start [B]:
        left padding; row b's state is that of its tokens from start[b] on, alone."""
        cfg, (B, T, _, D) = self.cfg, k.shape
        start = torch.zeros(B, dtype=torch.int64) if start is None else start.to("cpu", torch.int64)
        state = self.new_state(q)
        acc = state.S.dtype
        index = torch.arange(T, device=k.device)
        own = index[None] - start[:, None].to(k.device)  # [B, T]: each token's position in its row
        n_own = T - start  # [B]
        first = cfg.sinks if cfg.mode == "hybrid" else 0
        # keys before `last` of their row (and not sinks, nor padding) are in S and z
        last = (n_own - cfg.window if cfg.mode == "hybrid" else n_own).to(k.device)
        into_state = (own >= first) & (own < last[:, None])
        if cfg.mode != "window" and bool(into_state.any()):
            lo = int(into_state.float().argmax(1)[into_state.any(1)].min())  # (skip what no row takes)
            fk = self.feature_map_k(k[:, lo:]).to(acc) * into_state[:, lo:, None, None].to(acc)
            # (contiguous: the fused C step updates these tensors in place, row-major)
            state.S = torch.einsum("bthf,bthd->bhfd", fk, v[:, lo:].to(acc)).contiguous()
            state.z = fk.sum(1).contiguous()
        state.seen = n_own.clone()
        if cfg.mode == "linear":
            return state
        W, ns, Hk = cfg.window, cfg.sinks, self.n_kv_heads
        k, v = k[:, :, :: self.groups], v[:, :, :: self.groups]  # (one per key/value head: the group shares its ring)
        state.ring_k, state.ring_v = k.new_zeros(B, Hk, W, D), v.new_zeros(B, Hk, W, v.shape[-1])
        state.sink_k, state.sink_v = k.new_zeros(B, Hk, ns, D), v.new_zeros(B, Hk, ns, v.shape[-1])
        for b in range(B):  # (once per prompt: rows hold different numbers of tokens)
            s, n = int(start[b]), int(n_own[b])
            positions = torch.arange(max(0, n - W), n, device=k.device)  # the row's own, in its ring
            state.ring_k[b, :, positions % W] = k[b, s + positions].transpose(0, 1)
            state.ring_v[b, :, positions % W] = v[b, s + positions].transpose(0, 1)
            m = min(ns, n)
            state.sink_k[b, :, :m], state.sink_v[b, :, :m] = (
                k[b, s : s + m].transpose(0, 1),
                v[b, s : s + m].transpose(0, 1),
            )
        return state

    def step(self, q, k, v, state: HybridState) -> torch.Tensor:
        """One token: q, k, v [B, H, D] -> [B, H, D]; `state` advances."""
        cfg = self.cfg
        fq = self.feature_map_q(q) if cfg.mode != "window" else None
        return _step(q, k, v, fq, self.feature_map_k, state, cfg.mode, cfg.window, cfg.sinks, cfg.eps, self.groups)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        """`padding_start` [B] (a keyword LinearLlamaForCausalLM passes from its 2-D attention_mask):
        where each row's tokens begin after left padding. Packed documents come from position_ids
        that restart (as transformers finds them): each attends only to itself. A mask that hides
        keys otherwise (padding in a Llama converted in place) is refused: this layer reads no mask."""
        B, T, _ = hidden_states.shape
        start = kwargs.get("padding_start")  # (None with the key present: the model read its mask)
        documents = documents_of(kwargs.get("position_ids"), B, T) if start is None else None
        if documents is not None and isinstance(cache, LinearizedCache):
            raise ValueError(
                f"LinearizedAttention (layer {self.layer_idx}): packed documents (position_ids that restart) "
                "cannot fill one recurrent state per row; prefill each document in a row of its own"
            )
        if documents is None and "padding_start" not in kwargs and hides_keys(attention_mask):
            raise ValueError(
                f"LinearizedAttention (layer {self.layer_idx}): the attention mask hides keys (padding or packed "
                "documents), which this layer cannot read from a 4-D mask; load the model as linear_llama "
                "(linearize.from_linearized) for left padding, or give rows without padding"
            )
        q, k, v = self.project(hidden_states, position_embeddings)
        if not isinstance(cache, LinearizedCache):
            cache = None  # (a key/value cache transformers made: a linear layer has no use for it)
        state = cache.state(self.layer_idx) if cache is not None else None
        if state is None and (cache is None or T > 1):
            y = self.attend(q, k, v, start, documents)
            if cache is not None:  # prefill: the state after these tokens, from the same k, v
                cache.set_state(self.layer_idx, self.prefill_state(q, k, v, start))
        else:
            if state is None:
                state = self.new_state(q)
                cache.set_state(self.layer_idx, state)
            y = torch.stack([self.step(q[:, t], k[:, t], v[:, t], state) for t in range(T)], dim=1)
        if cache is not None and self.layer_idx == 0:  # (read before any layer runs: the next call sees it)
            cache.seen += T
        return self.o_proj(y.reshape(B, T, -1)), None


def hides_keys(mask) -> bool:
    """Whether transformers' processed attention mask (4-D bool, or additive float) hides any key
    from the last query, which sees every key of a plain causal sequence: padding or packing."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return False
    last = mask[..., -1, :]
    return bool(~last.all()) if last.dtype == torch.bool else bool((last < 0).any())


def attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every self-attention of a transformers decoder, checked to be
    of a shape this conversion handles; a one-line error names what is not."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"linearize: {type(model).__name__} has no .model.layers: not a Llama-style decoder")
    found = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, LinearizedAttention):
            raise ValueError(f"linearize: layer {i} is already linearised")
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attn, n)]
        if attn is None or missing:
            raise ValueError(
                f"linearize: layer {i}'s attention ({type(attn).__name__}) is not Llama-style (lacks "
                f"{', '.join(missing) or 'self_attn'}); supported: Llama, Mistral, Qwen2"
            )
        found.append((layer, "self_attn", attn))
    return found


def linearize(model: nn.Module, cfg: LinearizeConfig | None = None) -> nn.Module:
    """Replace every softmax attention of `model` (in place) by LinearizedAttention; returns the model.
    Only the feature maps are new parameters; everything else is the model's own."""
    cfg = cfg or LinearizeConfig()
    found = attention_modules(model)
    config = model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    for parent, name, attn in found:
        new = LinearizedAttention(attn, cfg, n_heads, n_kv)
        weight = attn.q_proj.weight
        new.feature_map_q.to(weight.device), new.feature_map_k.to(weight.device)
        setattr(parent, name, new)
    config.linearize = cfg.to_dict()
    return model


def feature_map_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters attention transfer trains: every layer's feature maps."""
    return [
        p
        for m in model.modules()
        if isinstance(m, LinearizedAttention)
        for p in [*m.feature_map_q.parameters(), *m.feature_map_k.parameters()]
    ]


class LinearizedCache(Cache):
    """transformers' `Cache` over a linearised model's recurrent state: one HybridState per layer,
    constant in size whatever the number of tokens seen (the window's ring, the sinks, S and z).
    Pass it as `past_key_values` (prefill, then one token per call); beam search reorders it."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.states: dict[int, HybridState] = {}
        self.seen = 0  # tokens fed (transformers' sequence length); layer 0 counts them

    def state(self, layer: int) -> HybridState | None:
        return self.states.get(layer)

    def set_state(self, layer: int, state: HybridState) -> None:
        self.states[layer] = state

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states.values())

    def __len__(self) -> int:
        return len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        n = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.seen + n, 0  # (the attention reads no mask)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = {i: s.index_select(beam_idx) for i, s in self.states.items()}

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.states:
            B = next(iter(self.states.values())).seen.shape[0]  # (S is None in window mode)
            self.reorder_cache(torch.arange(B).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("LinearizedCache: a recurrent state cannot be cropped back to an earlier position")

    def reset(self) -> None:
        self.states, self.seen = {}, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.states)
