"""AttentionLayer: projections, heads and one kind of attention, with a parallel forward and a
one-token recurrent `step` that compute the same function with the same weights."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .feature_maps import FeatureMap, make_feature_map
from .ops import KVCache, LinearState
from .ops.step import step as linear_step
from .ops.validation import accumulation_dtype

ATTENTION_KINDS = ("causal-linear", "linear", "causal-softmax", "softmax", "causal-lsh", "lsh")

State = LinearState | KVCache


class AttentionLayer(nn.Module):
    """Multi-head attention over x [B, T, d_model].

    Args:
        d_model: model width.
        n_heads: number of heads H.
        attention: "causal-linear" (paper, default), "linear" (non-causal), "causal-softmax", "softmax",
            or Reformer's "causal-lsh" / "lsh" (queries and keys from one shared projection).
        feature_map: name in `feature_maps.FEATURE_MAPS` or a FeatureMap instance (linear kinds only).
        d_keys: per-head query/key width before the feature map (default d_model // n_heads).
        d_values: per-head value width (default d_model // n_heads).
        dropout: dropout on the layer's output (after the output projection), the same for every kind.
        eps: normaliser epsilon of linear attention.
        chunk_size, backend: passed to `ops.causal_linear_attention`.
        feature_map_kwargs: extra arguments for a feature map given by name (e.g. {"n_features": 128}).
        n_hashes, n_buckets, lsh_chunk_size: LSH kinds only, see `ops.lsh_attention` (rotations are
            drawn afresh from torch's RNG at every forward, as in Reformer).

    State: causal-linear carries a `LinearState` (O(1) in length), causal-softmax a `KVCache`; LSH
    attention has no recurrent form (a model using it generates by recomputing the prefix).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        attention: str = "causal-linear",
        feature_map: str | FeatureMap = "elu",
        d_keys: int | None = None,
        d_values: int | None = None,
        dropout: float = 0.0,
        *,
        eps: float = 1e-6,
        chunk_size: int = 64,
        backend: str = "auto",
        feature_map_kwargs: dict | None = None,
        n_hashes: int = 1,
        n_buckets: int = 64,
        lsh_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"AttentionLayer: unknown attention {attention!r}; choose one of {ATTENTION_KINDS}")
        if d_model < 1 or n_heads < 1:
            raise ValueError(
                f"AttentionLayer: d_model and n_heads must be >= 1, got d_model={d_model}, n_heads={n_heads}"
            )
        if (d_keys is None or d_values is None) and d_model % n_heads:
            raise ValueError(
                f"AttentionLayer: d_model={d_model} is not divisible by n_heads={n_heads}; "
                f"change one of them or give d_keys and d_values explicitly"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AttentionLayer: dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.attention = d_model, n_heads, attention
        self.d_keys = d_keys or d_model // n_heads
        self.d_values = d_values or d_model // n_heads
        self.eps, self.chunk_size, self.backend = eps, chunk_size, backend
        self.n_hashes, self.n_buckets, self.lsh_chunk_size = n_hashes, n_buckets, lsh_chunk_size
        if self.is_lsh and (n_hashes < 1 or n_buckets < 2 or n_buckets % 2):
            raise ValueError(
                f"AttentionLayer: LSH needs n_hashes >= 1 and an even n_buckets >= 2, got {n_hashes}, {n_buckets}"
            )
        # Queries, keys and values come out of one matmul (one GEMM per token when generating);
        # LSH attention shares one projection between queries and keys.
        n_qk = 1 if self.is_lsh else 2
        self.qkv = nn.Linear(d_model, n_heads * (n_qk * self.d_keys + self.d_values))
        self.out = nn.Linear(n_heads * self.d_values, d_model)
        self.dropout = nn.Dropout(dropout)
        self.feature_map: FeatureMap | None = None
        if self.is_linear:
            if isinstance(feature_map, FeatureMap):
                if (feature_map.head_dim, feature_map.n_heads) != (self.d_keys, n_heads):
                    raise ValueError(
                        f"AttentionLayer: the feature map is for head_dim={feature_map.head_dim}, "
                        f"n_heads={feature_map.n_heads}, the layer has d_keys={self.d_keys}, n_heads={n_heads}"
                    )
                self.feature_map = feature_map
            else:
                self.feature_map = make_feature_map(feature_map, self.d_keys, n_heads, **(feature_map_kwargs or {}))
            if attention == "causal-linear" and not self.feature_map.non_negative:
                name = feature_map if isinstance(feature_map, str) else type(feature_map).__name__
                raise ValueError(
                    f"AttentionLayer: feature map {name!r} can give negative similarities, so causal attention's "
                    "normaliser (the query's features against the running sum of the keys') can reach zero and "
                    "training diverges; use a non-negative map (elu, relu, favor, hedgehog, taylor), or non-causal "
                    "'linear' attention for comparisons"
                )

    @property
    def is_linear(self) -> bool:
        return self.attention in ("causal-linear", "linear")

    @property
    def is_lsh(self) -> bool:
        return self.attention in ("causal-lsh", "lsh")

    @property
    def is_causal(self) -> bool:
        return self.attention.startswith("causal")

    def _check_input(self, x: torch.Tensor, rank: int, layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"AttentionLayer: x must be a tensor {layout}, got {type(x).__name__}")
        if x.dim() != rank or x.shape[-1] != self.d_model:
            raise ValueError(
                f"AttentionLayer: x must have shape {layout} with d_model={self.d_model}, got {list(x.shape)}"
            )

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., d_model] -> q, k [..., H, Dk'] (feature-mapped for linear kinds), v [..., H, Dv]."""
        H, Dk = self.n_heads, self.d_keys
        if self.is_lsh:
            qk, v = self.qkv(x).unflatten(-1, (H, -1)).split([Dk, self.d_values], dim=-1)
            return qk, qk, v
        q, k, v = self.qkv(x).unflatten(-1, (H, -1)).split([Dk, Dk, self.d_values], dim=-1)
        if self.feature_map is not None:
            q, k = self.feature_map.forward_queries(q), self.feature_map.forward_keys(k)
        return q, k, v

    def initial_state(self, batch: int, *, dtype: torch.dtype | None = None, device=None) -> State:
        """An empty recurrent state for `batch` sequences (causal-linear and causal-softmax)."""
        if not self.is_causal or self.is_lsh:
            raise self._no_recurrence("state")
        dtype = dtype or self.qkv.weight.dtype
        device = device or self.qkv.weight.device
        H = self.n_heads
        if self.attention == "causal-linear":
            return LinearState.zeros(batch, H, self.feature_map.feature_dim, self.d_values, dtype=dtype, device=device)
        return KVCache.empty(batch, H, self.d_keys, self.d_values, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        state: State | None = None,
        return_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        context_group=None,
    ) -> torch.Tensor | tuple[torch.Tensor, State]:
        """Parallel forward over x [B, T, d_model] -> y [B, T, d_model] (and the final state).

        key_padding_mask: bool [B, T], True where the token is padding; padded tokens are never
            attended to. state: continue from an earlier state (causal kinds; a KVCache is appended
            to in place). return_state: also return the state after the last token (prefill).
        cu_seqlens: packed documents in one row (B = 1), each attending within itself (linear kinds;
            see `ops.causal_linear_attention`); a state then has one row per document.
        context_group: a torch.distributed group whose ranks hold consecutive segments of the
            sequences, x being this rank's (causal-linear; `ops.context_parallel_causal_linear_attention`).
        """
        self._check_input(x, 3, "[B, T, d_model]")
        if (state is not None or return_state) and (not self.is_causal or self.is_lsh):
            raise self._no_recurrence("state")
        if cu_seqlens is not None and not self.is_linear:
            raise ValueError(
                f"AttentionLayer: packed documents (cu_seqlens) need linear attention, not {self.attention!r}"
            )
        B, T, _ = x.shape
        q, k, v = self.project(x)
        new_state: State | None = None
        if context_group is not None:
            if self.attention != "causal-linear" or cu_seqlens is not None or key_padding_mask is not None:
                raise ValueError(
                    "AttentionLayer: context parallelism runs causal-linear attention over whole sequences, "
                    f"not {self.attention!r} attention, packed documents or padding"
                )
            out, new_state = ops.context_parallel_causal_linear_attention(
                q,
                k,
                v,
                context_group,
                initial_state=state,
                return_state=True,
                eps=self.eps,
                chunk_size=self.chunk_size,
                backend=self.backend,
            )
        elif self.attention == "causal-linear":
            out, new_state = ops.causal_linear_attention(
                q,
                k,
                v,
                initial_state=state,
                return_state=True,
                eps=self.eps,
                chunk_size=self.chunk_size,
                backend=self.backend,
                key_padding_mask=key_padding_mask,
                cu_seqlens=cu_seqlens,
            )
        elif self.attention == "linear":
            out = ops.linear_attention(q, k, v, key_padding_mask=key_padding_mask, eps=self.eps, cu_seqlens=cu_seqlens)
        elif self.is_lsh:
            out = ops.lsh_attention(
                q,
                v,
                causal=self.is_causal,
                n_hashes=self.n_hashes,
                n_buckets=self.n_buckets,
                chunk_size=self.lsh_chunk_size,
                key_padding_mask=key_padding_mask,
            )
        elif state is not None or return_state:  # causal-softmax with a cache
            out, new_state = ops.softmax_attention_with_cache(q, k, v, state, key_padding_mask=key_padding_mask)
        else:
            out = ops.softmax_attention(q, k, v, causal=self.is_causal, key_padding_mask=key_padding_mask)
        y = self.dropout(self.out(out.reshape(B, T, -1)))
        return (y, new_state) if return_state else y

    def step(self, x_t: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One token: x_t [B, d_model] -> (y_t [B, d_model], state including this token).

        O(1) time and memory per token for causal-linear (the state is updated in place when no
        gradient is needed); O(tokens seen) for causal-softmax.
        """
        self._check_input(x_t, 2, "[B, d_model]")
        if not self.is_causal or self.is_lsh:
            raise self._no_recurrence("step")
        q, k, v = self.project(x_t)
        if self.attention == "causal-linear":
            if state is None:
                state = self.initial_state(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
            elif not (
                isinstance(state, LinearState)
                and state.S.shape == (x_t.shape[0], *self.state_shape)
                and state.S.dtype == accumulation_dtype(x_t.dtype)
                and state.S.device == x_t.device
            ):
                # the full check, with its message; the common case above skips it (it runs every token)
                ops.linear_attention_step(q, k, v, state, eps=self.eps)
            out, state = linear_step(q, k, v, state, self.eps)
        else:
            out, state = ops.softmax_attention_step(q, k, v, state)
        return self.dropout(self.out(out.reshape(x_t.shape[0], -1))), state

    def _no_recurrence(self, what: str) -> ValueError:
        if not self.is_causal:
            return ValueError(f"AttentionLayer: {self.attention!r} attention is not causal and has no recurrent {what}")
        return ValueError(
            f"AttentionLayer: {self.attention!r} attention has no recurrent {what} (LSH buckets depend on the "
            "whole sequence: recompute the prefix instead)"
        )

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """(H, Dk', Dv): the shape of one row's recurrent state S (Dk' the feature map's width)."""
        return (self.n_heads, self.feature_map.feature_dim, self.d_values)

    def extra_repr(self) -> str:
        lsh = f", n_hashes={self.n_hashes}, n_buckets={self.n_buckets}" if self.is_lsh else ""
        return (
            f"attention={self.attention!r}, d_model={self.d_model}, n_heads={self.n_heads}, "
            f"d_keys={self.d_keys}, d_values={self.d_values}{lsh}"
        )
