"""Linear attention in five minutes: a layer trained in parallel and run as an RNN with the same
weights, the bare operation with its state, and packed documents of different lengths.

    python examples/quickstart.py
"""

import torch

from linear_transformers import AttentionLayer, ops

torch.manual_seed(0)

# 1. A drop-in attention layer: parallel over the whole sequence, or one token at a time.
layer = AttentionLayer(d_model=64, n_heads=4, attention="causal-linear", feature_map="elu")
x = torch.randn(2, 300, 64)  # [B, T, d_model]
y = layer(x)  # training form: O(T)
_, state = layer(x[:, :200], return_state=True)  # prefill: the RNN state after 200 tokens
with torch.no_grad():
    for t in range(200, 300):  # generation form: O(1) per token, a state of fixed size
        y_t, state = layer.step(x[:, t], state)
print(f"layer: recurrent == parallel, largest difference {(y_t - y[:, -1]).abs().max().item():.1e}")

# 2. The operation itself, on feature-mapped queries and keys [B, T, H, D]; its state hands over exactly.
q, k, v = torch.rand(1, 1000, 4, 32), torch.rand(1, 1000, 4, 32), torch.randn(1, 1000, 4, 32)
whole = ops.causal_linear_attention(q, k, v)
first, s = ops.causal_linear_attention(q[:, :600], k[:, :600], v[:, :600], return_state=True)
rest = ops.causal_linear_attention(q[:, 600:], k[:, 600:], v[:, 600:], initial_state=s)
print(f"op: two halves with the state handed over == whole, {(torch.cat([first, rest], 1) - whole).abs().max():.1e}")
print(f"    the state: S {list(s.S.shape)}, z {list(s.z.shape)}, after {s.n_tokens} tokens")

# 3. Documents of different lengths packed in one row, each attending only within itself.
cu = torch.tensor([0, 7, 8, 1000])  # three documents: 7, 1 and 992 tokens
packed, states = ops.causal_linear_attention(q, k, v, cu_seqlens=cu, return_state=True)
alone = ops.causal_linear_attention(q[:, 8:], k[:, 8:], v[:, 8:])
print(f"packed: the third document == run alone, {(packed[:, 8:] - alone).abs().max():.1e}")
print(f"    one state per document: S {list(states.S.shape)}")
