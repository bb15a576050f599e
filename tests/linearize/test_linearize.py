"""Linearising a Llama-style model: the hybrid's banded + chunked training form equals its
recurrent form (outputs and states, every mode, awkward lengths), the window form with a window
covering the whole sequence is the teacher's softmax attention, and a converted tiny random Llama
steps token by token to the logits of its parallel forward."""

from __future__ import annotations

import pytest
import torch

from linear_transformers.linearize import (
    HedgehogFeatureMap,
    LinearizeConfig,
    LinearizedCache,
    feature_map_parameters,
    hybrid_attention,
    linearize,
)
from linear_transformers.linearize.attention import HybridState, step_attention

transformers = pytest.importorskip("transformers")


def _steps(q, k, v, fmq, fmk, mode, window, sinks, eps):
    B, T, H, D = q.shape
    acc = torch.float64
    F = fmk(k[:, :1]).shape[-1]
    state = HybridState(torch.zeros(B, H, F, D, dtype=acc), torch.zeros(B, H, F, dtype=acc))
    ys = []
    for t in range(T):
        fq = fmq(q[:, t]) if mode != "window" else None
        ys.append(step_attention(q[:, t], k[:, t], v[:, t], fq, fmk, state, mode, window, sinks, eps))
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("mode", ["hybrid", "window"])
@pytest.mark.parametrize(("T", "window", "sinks"), [(1, 4, 2), (13, 4, 2), (33, 8, 0), (40, 8, 3), (9, 16, 4),
                                                     (25, 3, 5)])  # fmt: skip
def test_hybrid_parallel_equals_recurrent(mode, T, window, sinks):
    g = torch.Generator().manual_seed(T * 7 + window)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    fm_q, fm_k = HedgehogFeatureMap(H, D).double(), HedgehogFeatureMap(H, D).double()
    with torch.no_grad():
        for p in [*fm_q.parameters(), *fm_k.parameters()]:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    fq, fk = (fm_q(q), fm_k(k)) if mode == "hybrid" else (None, None)
    y = hybrid_attention(q, k, v, fq, fk, window, sinks, 1e-6)
    y_steps, _ = _steps(q, k, v, fm_q, fm_k, mode, window, sinks, 1e-6)
    torch.testing.assert_close(y, y_steps, rtol=1e-10, atol=1e-10)


def test_hybrid_gradients_flow_to_the_feature_maps_and_match_the_recurrent_form():
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 21, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    fm_q, fm_k = HedgehogFeatureMap(H, D).double(), HedgehogFeatureMap(H, D).double()
    grads = []
    for parallel in (True, False):
        fm_q.zero_grad(), fm_k.zero_grad()
        if parallel:
            y = hybrid_attention(q, k, v, fm_q(q), fm_k(k), 4, 2, 1e-6)
        else:
            y, _ = _steps(q, k, v, fm_q, fm_k, "hybrid", 4, 2, 1e-6)
        (y * torch.linspace(-1, 1, D, dtype=torch.float64)).sum().backward()
        grads.append([p.grad.clone() for p in [*fm_q.parameters(), *fm_k.parameters()]])
    for a, b in zip(*grads, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_window_covering_the_sequence_is_softmax_attention():
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 19, 2, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    y = hybrid_attention(q, k, v, None, None, 32, 4, 0.0)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_window_model_with_a_long_window_is_the_teacher():
    teacher = _tiny_llama()
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        ref = teacher(tokens).logits
        student = linearize(teacher, LinearizeConfig(mode="window", window=64, sinks=2, eps=0.0))
        torch.testing.assert_close(student(tokens).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["linear", "hybrid", "window"])
def test_converted_llama_steps_to_its_parallel_logits(mode):
    model = linearize(_tiny_llama(), LinearizeConfig(mode=mode, window=4, sinks=2))
    with torch.no_grad():
        for p in feature_map_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
        tokens = torch.randint(0, 97, (2, 17))
        full = model(tokens).logits
        cache = LinearizedCache()
        prefill = model(tokens[:, :9], past_key_values=cache, use_cache=True).logits
        steps = [model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True,
                       position_ids=torch.full((2, 1), t)).logits for t in range(9, 17)]  # fmt: skip
    torch.testing.assert_close(prefill, full[:, :9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 9:], rtol=1e-4, atol=1e-4)


def test_unsupported_models_and_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        LinearizeConfig(mode="fast")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        LinearizeConfig(feature_map="fourier")
    with pytest.raises(ValueError, match="no .model.layers"):
        linearize(torch.nn.Linear(2, 2))
    model = linearize(_tiny_llama())
    with pytest.raises(ValueError, match="already linearised"):
        linearize(model)
