"""linear_attention_step: one token of the RNN, in place under no_grad, differentiable otherwise."""

from __future__ import annotations

import torch

from linear_transformers import ops
from linear_transformers.ops import LinearState

from helpers import qkv, random_state, rel_err


def test_step_matches_equations_18_to_20():
    q, k, v = (x[:, 0] for x in qkv(2, 1, 3, 5, 4))
    state = random_state(2, 3, 5, 4)
    S = state.S + k[..., :, None] * v[..., None, :]
    z = state.z + k
    expected = torch.einsum("bhd,bhde->bhe", q, S) / (torch.einsum("bhd,bhd->bh", q, z) + 1e-6)[..., None]
    out, new = ops.linear_attention_step(q, k, v, state.clone())
    assert rel_err(out, expected) < 1e-12
    assert rel_err(new.S, S) < 1e-12 and rel_err(new.z, z) < 1e-12 and new.n_tokens == state.n_tokens + 1


def test_step_updates_in_place_without_grad():
    q, k, v = (x[:, 0] for x in qkv(2, 1, 3, 5, 4))
    state = random_state(2, 3, 5, 4)
    S_ptr = state.S.data_ptr()
    with torch.no_grad():
        _, new = ops.linear_attention_step(q, k, v, state)
    assert new is state and new.S.data_ptr() == S_ptr and state.n_tokens == 6


def test_step_builds_graph_when_grad_needed():
    q, k, v = (x[:, 0].detach().requires_grad_() for x in qkv(1, 1, 2, 3, 3))
    state = random_state(1, 2, 3, 3, requires_grad=True)
    S_before = state.S.detach().clone()
    out, new = ops.linear_attention_step(q, k, v, state)
    assert new is not state and torch.equal(state.S.detach(), S_before)
    out.sum().backward()
    assert q.grad is not None and state.S.grad is not None and state.z.grad is not None
    assert torch.autograd.gradcheck(
        lambda q, k, v, S, z: ops.linear_attention_step(q, k, v, LinearState(S, z))[0],
        (q, k, v, state.S, state.z),
    )


def test_step_low_precision_keeps_float32_state():
    q, k, v = (x[:, 0] for x in qkv(2, 1, 2, 4, 4, torch.bfloat16))
    out, state = ops.linear_attention_step(q, k, v)
    assert out.dtype == torch.bfloat16 and state.S.dtype == torch.float32 and state.n_tokens == 1
