"""Linear attention for a pretrained Llama-style layer: learned feature maps, the sliding-window
hybrid with attention sinks, its parallel (training) form and its recurrent (generation) form.

Per head, with q and k after RoPE (k and v repeated over the query heads they serve):

    linear   y_i = φq(q_i)ᵀ S_i / (φq(q_i)ᵀ z_i + eps),  S_i = Σ_{j<=i} φk(k_j) v_jᵀ   (the paper's)
    hybrid   y_i = (Σ_{j∈A_i} a_ij v_j + Σ_{j∈L_i} l_ij v_j) / (Σ_{j∈A_i} a_ij + Σ_{j∈L_i} l_ij + eps)
             A_i = the last `window` positions and the first `sinks` ones (softmax part),
             a_ij = exp(q_i·k_j/√D - m_i), m_i = max_{j∈A_i} q_i·k_j/√D;
             L_i = every other position j <= i (linear part), l_ij = φq(q_i)·φk(k_j)
    window   the hybrid without its linear part (softmax over the window and sinks alone)

One normaliser spans both parts (as in LoLCATs), so the feature maps learn how much the far past
weighs against the window. The recurrent state is the linear state (S, z), a ring of the last
`window` keys and values and the sink tokens': O(window) per token, whatever the position.

The hybrid's training form is banded + chunked (`hybrid_attention`): chunks of `window` queries
see their own chunk and the one before through the band, the first `sinks` keys directly, and the
linear state of every chunk before that, summed over chunks: O(T · window), no T x T mask. The
pure linear form runs through this library's causal_linear_attention (any backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import feature_maps, ops

MODES = ("linear", "hybrid", "window")
# the key of each mode's held-out perplexity in result.json
PPL_KEYS = {"linear": "linear_ppl", "hybrid": "hybrid_ppl", "window": "window_only_ppl"}
FEATURE_MAPS = ("hedgehog", "elu", "relu")


def make_feature_map(kind: str, heads: int, dim: int) -> nn.Module:
    """The library's feature map `kind` (feature_maps.py: Hedgehog learned per head, starting from
    softmax(±x); elu+1 and relu fixed) for `heads` heads of `dim`."""
    if kind not in FEATURE_MAPS:
        raise ValueError(f"linearize: feature_map must be one of {', '.join(FEATURE_MAPS)}, got {kind!r}")
    return feature_maps.make_feature_map(kind, dim, heads)


# ---- the parallel forms ---------------------------------------------------------------------------


def linear_attention(fq, fk, v, eps: float, backend: str = "auto", cu_seqlens=None) -> torch.Tensor:
    """Pure causal linear attention of feature-mapped fq, fk [B, T, H, F] and v [B, T, H, Dv];
    cu_seqlens [n + 1]: packed documents over the B T tokens taken row after row (each alone)."""
    if cu_seqlens is None:
        return ops.causal_linear_attention(fq, fk, v, eps=eps, backend=backend)
    B, T = v.shape[:2]
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (fq, fk, v)]
    return ops.causal_linear_attention(*flat, eps=eps, backend=backend, cu_seqlens=cu_seqlens).view(v.shape)


def documents_of(position_ids: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """cu_seqlens [n + 1] of the documents packed in rows [B, T], numbered row after row: a document
    starts each row and wherever position_ids do not go up by one (transformers' rule for packed
    sequences); None when every row is one sequence."""
    if position_ids is None or T < 2:
        return None
    pos = position_ids.expand(B, T) if position_ids.shape[0] == 1 else position_ids
    starts = torch.ones(B, T, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    at = starts.reshape(-1).nonzero()[:, 0].cpu()
    return torch.cat([at, torch.tensor([B * T])]).to(torch.int64)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor | None,
    fk: torch.Tensor | None,
    window: int,
    sinks: int,
    eps: float,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The hybrid (fq, fk given) or window-only (None) attention of q, k [B, T, H, D], v [B, T, H, Dv]
    and the feature maps fq, fk [B, T, H, F], banded + chunked (chunks of `window`). Returns [B, T, H, Dv].
    start [B]: left padding, row b's tokens begin at start[b]: no query sees a key before it, the
    sinks are the row's own first tokens, and a padding position's output is 0."""
    B, T, H, D = q.shape
    W, n = window, -(-T // window)
    pad = n * W - T
    scale = 1.0 / math.sqrt(D)

    def chunks(x):  # [B, T, H, X] -> [B, H, n, W, X], zero-padded at the end
        x = nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, n, W, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    def previous(x):  # the chunk before each chunk (zeros before the first)
        return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    kp, vp = previous(kc), previous(vc)
    a = torch.arange(W, device=q.device)
    pos_q = torch.arange(n, device=q.device)[:, None] * W + a  # [n, W] position of each query
    pos_p = pos_q - W  # of each key of the previous chunk
    first = torch.zeros(B, dtype=torch.long, device=q.device) if start is None else start.to(q.device).long()
    first_ = first[:, None, None, None]  # [B, 1(n), 1(query), 1(key)]
    # window band: the own chunk up to the query; the previous chunk after the query's offset; no
    # key before the row's first token
    own_mask = (a[None, :] <= a[:, None]) & (pos_q[:, None, :] >= first_)  # [B, n, W(query), W(key)]
    prev_mask = (a[None, :] > a[:, None])[None] & (pos_p[:, None, :] >= first_)  # [B, n, W, W]
    # sink keys (the row's first `sinks` tokens) outside the band are seen directly
    n_sinks = min(sinks, T)  # (a sequence shorter than the sinks has only its own tokens)
    sink_pos = first[:, None] + torch.arange(n_sinks, device=q.device)  # [B, sinks]
    sink_mask = (sink_pos[:, None, None] <= pos_q[None, ..., None] - W) & (sink_pos < T)[:, None, None]
    sink_mask = sink_mask[:, None]  # [B, 1(H), n, W, sinks]: not in the band already
    own_mask, prev_mask = own_mask[:, None], prev_mask[:, None]  # [B, 1(H), n, W, W]
    s_own = torch.einsum("bhnid,bhnjd->bhnij", qc, kc) * scale
    s_prev = torch.einsum("bhnid,bhnjd->bhnij", qc, kp) * scale
    s_own = s_own.masked_fill(~own_mask, -math.inf)
    s_prev = s_prev.masked_fill(~prev_mask, -math.inf)
    parts = [s_own, s_prev]
    if n_sinks:
        at = sink_pos.clamp(max=T - 1)[:, :, None, None]  # (a sink past the row's end is masked)
        ks = k.gather(1, at.expand(-1, -1, H, D)).transpose(1, 2)  # [B, H, sinks, D]
        vs = v.gather(1, at.expand(-1, -1, H, v.shape[-1])).transpose(1, 2)
        s_sink = torch.einsum("bhnid,bhsd->bhnis", qc, ks) * scale
        parts.append(s_sink.masked_fill(~sink_mask, -math.inf))
    # (the linear part is not scaled by exp(-m): m is part of the function, and gradients flow through it)
    m = torch.cat(parts, dim=-1).amax(dim=-1, keepdim=True)  # the own chunk holds the query itself ...
    if start is not None:
        m = m.clamp_min(torch.finfo(m.dtype).min)  # ... unless it is padding: it sees nothing, outputs 0
    a_own, a_prev = torch.exp(s_own - m), torch.exp(s_prev - m)
    num = torch.einsum("bhnij,bhnjd->bhnid", a_own, vc) + torch.einsum("bhnij,bhnjd->bhnid", a_prev, vp)
    den = a_own.sum(-1, keepdim=True) + a_prev.sum(-1, keepdim=True)
    if n_sinks:
        a_sink = torch.exp(parts[2] - m)
        num = num + torch.einsum("bhnis,bhsd->bhnid", a_sink, vs)
        den = den + a_sink.sum(-1, keepdim=True)
    if fq is not None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        fqc, fkc = chunks(fq).to(acc), chunks(fk).to(acc)
        # sink keys and padding stay out of the linear part
        keep = (pos_q[None] - first[:, None, None] >= sinks).to(acc)[:, None, ..., None]  # [B, 1, n, W, 1]
        fkc = fkc * keep
        fkp, vp_acc = previous(fkc), vp.to(acc)
        # linear part: the previous chunk's keys at or before the query's offset ...
        lin_prev = torch.einsum("bhnif,bhnjf->bhnij", fqc, fkp).masked_fill(
            (a[None, :] > a[:, None]) | (pos_p < 0)[:, None], 0.0
        )
        # ... and every chunk before that, through the per-chunk state summed over chunks
        kv = torch.einsum("bhnjf,bhnjd->bhnfd", fkc, vc.to(acc))
        zc = fkc.sum(3)  # [B, H, n, F]
        S_before = previous(previous(torch.cumsum(kv, dim=2)))
        z_before = previous(previous(torch.cumsum(zc, dim=2)))
        num = num.to(acc) + torch.einsum("bhnij,bhnjd->bhnid", lin_prev, vp_acc)
        num = num + torch.einsum("bhnif,bhnfd->bhnid", fqc, S_before)
        den = den.to(acc) + lin_prev.sum(-1, keepdim=True) + torch.einsum("bhnif,bhnf->bhni", fqc, z_before)[..., None]
    y = (num / (den + eps)).to(v.dtype)  # [B, H, n, W, Dv]
    return y.permute(0, 2, 3, 1, 4).reshape(B, n * W, H, -1)[:, :T]


# ---- the recurrent form ---------------------------------------------------------------------------


@dataclass
class HybridState:
    """One layer's recurrent state: the linear part's S [B, H, F, Dv] and z [B, H, F] per query head
    (float32, or float64 for float64 inputs), the last `window` keys and values [B, Hkv, window, D]
    per key/value head (a ring, slot position % window; a group's query heads share it), the sink
    tokens' [B, Hkv, sinks, D], and `seen` [B] (int64): the tokens each row holds (its own: left
    padding is not seen, so a padded row's state is the one it has alone)."""

    S: torch.Tensor | None
    z: torch.Tensor | None
    ring_k: torch.Tensor | None = None
    ring_v: torch.Tensor | None = None
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    seen: torch.Tensor | None = None  # (None: a new state, 0 for every row)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seen is None:
            rows = next(t for t in (self.S, self.ring_k) if t is not None).shape[0]
            self.seen = torch.zeros(rows, dtype=torch.int64)

    def index_select(self, index: torch.Tensor) -> HybridState:
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return HybridState(
            pick(self.S),
            pick(self.z),
            pick(self.ring_k),
            pick(self.ring_v),
            pick(self.sink_k),
            pick(self.sink_v),
            self.seen.index_select(0, index.to(self.seen.device)),
        )

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.S, self.z, self.ring_k, self.ring_v, self.sink_k, self.sink_v)
            if t is not None
        )


def step_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor | None,
    fk_of,
    state: HybridState,
    mode: str,
    window: int,
    sinks: int,
    eps: float,
    groups: int = 1,
) -> torch.Tensor:
    """One token: q, k [B, H, D], v [B, H, Dv] (after RoPE, k/v repeated over the query heads: each
    key/value head `groups` times in a row); fq [B, H, F] the query's features; fk_of(k) the key map
    (applied to the key that leaves the window, repeated over its group, or to the new key in linear
    mode). The ring and the sinks keep each key/value head once. Updates `state` in place; returns
    [B, H, Dv]. Each row's token is its state.seen[b]-th (rows of a left-padded batch differ)."""
    acc = state.S.dtype if state.S is not None else torch.float32
    if mode == "linear":
        fk = fk_of(k).to(acc)
        state.S = state.S + fk[..., :, None] * v.to(acc)[..., None, :]
        state.z = state.z + fk
        fqa = fq.to(acc)
        num = torch.einsum("bhf,bhfd->bhd", fqa, state.S)
        den = torch.einsum("bhf,bhf->bh", fqa, state.z)[..., None]
        state.seen = state.seen + 1
        return (num / (den + eps)).to(v.dtype)
    B, H, D = k.shape
    Hk, Dv = H // groups, v.shape[-1]
    k, v = k[:, ::groups], v[:, ::groups]  # [B, Hkv, D]: one per key/value head
    t = state.seen.to(k.device)  # [B]
    rows = torch.arange(B, device=k.device)
    if state.ring_k is not None and state.ring_k.shape[1] != Hk:
        raise ValueError(
            f"step_attention: the state's ring holds {state.ring_k.shape[1]} key/value heads, but {H} query "
            f"heads in groups of {groups} make {Hk}: pass groups = n_heads // n_kv_heads"
        )
    if state.ring_k is None:
        state.ring_k = k.new_zeros(B, Hk, window, D)
        state.ring_v = v.new_zeros(B, Hk, window, Dv)
        state.sink_k = k.new_zeros(B, Hk, sinks, D)
        state.sink_v = v.new_zeros(B, Hk, sinks, Dv)
    slot = t % window
    leaving = (t >= window) & (t - window >= sinks)  # rows whose key leaving the window joins the state
    if mode == "hybrid" and bool(leaving.any()):
        old_k, old_v = state.ring_k[rows, :, slot], state.ring_v[rows, :, slot]  # [B, Hkv, D]
        old_k, old_v = old_k.repeat_interleave(groups, 1), old_v.repeat_interleave(groups, 1)
        fk = fk_of(old_k).to(acc) * leaving.to(acc)[:, None, None]
        state.S = state.S + fk[..., :, None] * old_v.to(acc)[..., None, :]
        state.z = state.z + fk
    state.ring_k = state.ring_k.clone()
    state.ring_v = state.ring_v.clone()
    state.ring_k[rows, :, slot], state.ring_v[rows, :, slot] = k, v
    sinking = t < sinks
    if bool(sinking.any()):
        state.sink_k = state.sink_k.clone()
        state.sink_v = state.sink_v.clone()
        state.sink_k[rows[sinking], :, t[sinking]] = k[sinking]
        state.sink_v[rows[sinking], :, t[sinking]] = v[sinking]
    # positions held by the ring: slot s holds the latest p <= t with p % window == s
    s_idx = torch.arange(window, device=k.device)
    ring_pos = t[:, None] - ((t[:, None] - s_idx) % window)  # [B, window]
    ring_ok = ((ring_pos >= 0) & (ring_pos >= sinks))[:, None]  # sink positions are counted once, from the sinks
    sink_ok = (torch.arange(sinks, device=k.device) <= t[:, None])[:, None]
    scale = 1.0 / math.sqrt(D)
    qg = q.view(B, Hk, groups, D)  # (the query heads of each key/value head's group)
    s_ring = torch.einsum("bgjd,bgwd->bgjw", qg, state.ring_k).reshape(B, H, window) * scale
    s_sink = torch.einsum("bgjd,bgsd->bgjs", qg, state.sink_k).reshape(B, H, sinks) * scale
    s_ring = s_ring.masked_fill(~ring_ok, -math.inf)
    s_sink = s_sink.masked_fill(~sink_ok, -math.inf)
    m = torch.cat([s_ring, s_sink], dim=-1).amax(-1, keepdim=True)
    a_ring, a_sink = torch.exp(s_ring - m), torch.exp(s_sink - m)
    num = torch.einsum("bgjw,bgwd->bgjd", a_ring.view(B, Hk, groups, window), state.ring_v) + torch.einsum(
        "bgjs,bgsd->bgjd", a_sink.view(B, Hk, groups, sinks), state.sink_v
    )
    num = num.reshape(B, H, Dv)
    den = a_ring.sum(-1, keepdim=True) + a_sink.sum(-1, keepdim=True)
    if mode == "hybrid":
        fqa = fq.to(acc)
        num = num.to(acc) + torch.einsum("bhf,bhfd->bhd", fqa, state.S)
        den = den.to(acc) + torch.einsum("bhf,bhf->bh", fqa, state.z)[..., None]
    state.seen = state.seen + 1
    return (num / (den + eps)).to(v.dtype)
