"""The pieces a CausalTransformer is stacked from: the Block (attention and a feed-forward layer,
each with its residual and LayerNorm, before or after: pre-LN or post-LN) and the sinusoidal
position encodings. The model (model.py) builds them from its ModelConfig."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import AttentionLayer

if TYPE_CHECKING:
    from .model import ModelConfig


class Block(nn.Module):
    """One transformer block of a CausalTransformer (attention, then the feed-forward layer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn = AttentionLayer(
            cfg.d_model,
            cfg.n_heads,
            cfg.attention,
            cfg.feature_map,
            eps=cfg.eps,
            chunk_size=cfg.chunk_size,
            n_hashes=cfg.lsh_hashes,
            n_buckets=cfg.lsh_buckets,
            lsh_chunk_size=cfg.lsh_chunk or None,
        )
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    # The feed-forward's two linear layers by name (ff stays a Sequential: checkpoints say ff.0, ff.2).
    @property
    def ff_in(self) -> nn.Linear:
        return self.ff[0]

    @property
    def ff_out(self) -> nn.Linear:
        return self.ff[2]

    def mix(self, x, attend):
        """The block around its attention: x -> (y, attend's state), with attend(h) -> (output, state)
        given the (normed, for pre-LN) input; the parallel forward, the step and the ONNX export share it."""
        if self.pre_norm:
            y, state = attend(self.norm1(x))
            x = x + self.dropout(y)
            return x + self.ff(self.norm2(x)), state
        y, state = attend(x)
        x = self.norm1(x + self.dropout(y))
        return self.norm2(x + self.ff(x)), state

    def forward(
        self, x: torch.Tensor, state=None, return_state: bool = False, key_padding_mask=None, **attention_kwargs
    ):
        """x [B, T, d_model] -> y (and the attention state after the last token). key_padding_mask
        [B, T]: True where x is padding, which no position attends to. attention_kwargs (cu_seqlens,
        context_group) go to the attention layer."""

        def attend(h):
            if return_state or state is not None:
                return self.attn(
                    h, key_padding_mask=key_padding_mask, state=state, return_state=True, **attention_kwargs
                )
            return self.attn(h, key_padding_mask=key_padding_mask, **attention_kwargs), None

        y, new_state = self.mix(x, attend)
        return (y, new_state) if return_state else y

    def step(self, x: torch.Tensor, state):
        """x [B, d_model] -> (y [B, d_model], state)."""
        return self.mix(x, lambda h: self.attn.step(h, state))


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """[n, d] sin/cos positional encodings (Vaswani et al. 2017)."""
    position = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : d // 2]
    return table.float()
