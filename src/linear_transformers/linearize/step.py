"""A linearised Llama-style model's weights by role for the fused C step (decode/llama.py), and the
choice, per token of transformers' generate(), between that step and the PyTorch layers.

`llama_weights(model)` describes any model that `linearize` converted (Llama, Mistral; Qwen2's
q/k/v biases included) or says why it cannot (`why_not_fused`): the C step computes RMSNorm, SiLU
MLPs without biases, RoPE with static inverse frequencies, and LinearizedAttention's modes and maps.
`fused_logits` is what LinearLlamaForCausalLM.forward calls first: where the fused step applies
(inference, one new token per row after a prefill, float32 CPU weights) it returns the logits and
advances the LinearizedCache in place; otherwise None, and the layers run in PyTorch.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from ..decode import DecodeConfig, fused, llama
from .convert import LinearizedAttention, LinearizedCache


def why_not_fused(model: nn.Module) -> str | None:
    """Why the fused C step does not compute `model` (one clause), or None where it does."""
    config = model.config
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return "it is not a Llama-style causal LM (model.layers, lm_head)"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        return f"its MLP is not SiLU-gated without biases (hidden_act {config.hidden_act!r})"
    if model.lm_head.bias is not None:
        return "its LM head has a bias"
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq") or "dynamic" in str(getattr(rotary, "rope_type", "")):
        return "its RoPE is not static (dynamic scaling recomputes the frequencies per length)"
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if not isinstance(attn, LinearizedAttention):
            return f"layer {i}'s attention is {type(attn).__name__}, not LinearizedAttention"
        if attn.cfg.mode not in llama.MODES or attn.cfg.feature_map not in llama.FEATURE_MAPS:
            return f"layer {i}'s mode {attn.cfg.mode!r} / feature map {attn.cfg.feature_map!r} is not computed in C"
        mlp = layer.mlp
        plain = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not nn.Linear for m in plain):
            return f"layer {i} has a wrapped projection (an adapter, say: merge it first)"
    return None


def llama_weights(model: nn.Module) -> llama.LlamaWeights | None:
    """The weights by role of a linearised Llama-style model (None where why_not_fused says why not)."""
    if why_not_fused(model) is not None:
        return None
    inner = model.model
    first = inner.layers[0].self_attn
    cfg = first.cfg
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        entry = {
            "attn_norm": layer.input_layernorm.weight,
            "mlp_norm": layer.post_attention_layernorm.weight,
            "wq": attn.q_proj.weight,
            "wk": attn.k_proj.weight,
            "wv": attn.v_proj.weight,
            "wo": attn.o_proj.weight,
            "wg": mlp.gate_proj.weight,
            "wu": mlp.up_proj.weight,
            "wd": mlp.down_proj.weight,
            "bq": attn.q_proj.bias,
            "bk": attn.k_proj.bias,
            "bv": attn.v_proj.bias,
            "bo": attn.o_proj.bias,
            "fq_w": None,
            "fq_b": None,
            "fk_w": None,
            "fk_b": None,
        }
        if cfg.feature_map == "hedgehog" and cfg.mode != "window":
            entry.update(
                fq_w=attn.feature_map_q.weight,
                fq_b=attn.feature_map_q.bias,
                fk_w=attn.feature_map_k.weight,
                fk_b=attn.feature_map_k.bias,
            )
        layers.append(entry)
    rotary = inner.rotary_emb
    return llama.LlamaWeights(
        layers=layers,
        embed=inner.embed_tokens.weight,
        final_norm=inner.norm.weight,
        head=model.lm_head.weight,
        inv_freq=rotary.inv_freq,
        n_heads=first.n_heads,
        n_kv_heads=first.n_kv_heads,
        head_dim=first.head_dim,
        mode=cfg.mode,
        feature_map=cfg.feature_map,
        window=cfg.window,
        sinks=cfg.sinks,
        rms_eps=float(inner.norm.variance_epsilon),
        attn_eps=float(cfg.eps),
        rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
    )


# The fused steps built for each model, one per weight format (each rebuilt when the model's weights
# move, are replaced or, for copies, change)
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Models inside `weights_fixed`: the steps (or None) already checked against their weights there
_FIXED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def weights_fixed(model: nn.Module):
    """Within: `model`'s weights do not change, so `fused_step` checks them once per format, at the
    first token, instead of at every token (where asking each of its ~400 parameters for its address
    and version took 145 us a token, read cold after the step has streamed the weights through the
    caches: BENCHMARKS.md). transformers' generate() runs inside one (LinearLlamaForCausalLM.generate), as
    linearize.generate's loop holds its step for the whole generation. Changing the weights in place
    inside one (a streamer that trains, say) is not seen until it ends."""
    before = _FIXED.get(model)
    _FIXED[model] = {}
    try:
        yield
    finally:
        if before is None:
            _FIXED.pop(model, None)
        else:
            _FIXED[model] = before


def fused_step(model: nn.Module, config: DecodeConfig) -> llama.FusedLlamaStep | None:
    """The fused step over `model`'s current weights in config's format, or None where it does not
    apply (config.fused off, a model the C step does not compute, weights not float32 on the CPU, the
    library unavailable)."""
    if not config.fused or not llama.available():
        return None
    fixed = _FIXED.get(model)
    if fixed is None:
        return _current_step(model, config)
    key = (config.weights, config.dot)
    if key not in fixed:
        fixed[key] = _current_step(model, config)
    return fixed[key]


def _current_step(model: nn.Module, config: DecodeConfig) -> llama.FusedLlamaStep | None:
    built = _STEPS.setdefault(model, {})
    step = built.get((config.weights, config.dot))
    if step is not None:
        if step.current():
            return step  # (the common case: nothing registered anywhere since the step was built)
        params = list(model.parameters())  # something registered a module somewhere (transformers slices
        # ModuleLists in every forward): the same parameters, unchanged, keep the step
        if (
            len(params) == len(step.sources)
            and all(p is q for p, q in zip(params, step.sources, strict=True))
            and [p.data_ptr() for p in params] == step.source_ptrs
            and (step.source_versions is None or [p._version for p in params] == step.source_versions)
        ):
            step.generation = fused.current_generation()
            return step
    found = llama_weights(model)
    if found is None or any(
        t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in found.tensors()
    ):
        return None  # (a copy of a strided weight would not see the model's in-place updates)
    step = llama.FusedLlamaStep(found, config.weights, config.dot)
    step.generation = fused.current_generation()
    step.sources = [p for p in model.parameters()]
    step.source_ptrs = [p.data_ptr() for p in step.sources]
    step.source_versions = [p._version for p in step.sources] if config.weights != torch.float32 else None
    built[(config.weights, config.dot)] = step
    return step


def fused_logits(model, input_ids, position_ids, cache, inputs_embeds, labels, kwargs) -> torch.Tensor | None:
    """Logits [B, 1, vocab] of one new token per row through the fused step, the cache advanced; or
    None where the PyTorch layers must run (training, gradients, a prompt, no recurrent state yet,
    outputs the C step does not give, a model or device it does not compute)."""
    if (
        model.training
        or torch.is_grad_enabled()
        or inputs_embeds is not None
        or labels is not None
        or input_ids is None
        or input_ids.dim() != 2
        or input_ids.shape[1] != 1
        or input_ids.device.type != "cpu"
        or not isinstance(cache, LinearizedCache)
        or len(cache.states) != model.config.num_hidden_layers
        or kwargs.get("output_attentions")
        or kwargs.get("output_hidden_states")
    ):
        return None
    step = fused_step(model, getattr(model, "decode_config", DecodeConfig()))
    if step is None:
        return None
    states = [cache.states[i] for i in range(model.config.num_hidden_layers)]
    B = input_ids.shape[0]
    if not step.knows(B, states) and any(s.S is None or s.S.shape[0] != B for s in states):
        return None
    if position_ids is not None:
        positions = position_ids[:, -1].expand(B) if position_ids.shape[0] == 1 else position_ids[:, -1]
    else:
        positions = states[0].seen.clone()  # (each row's own count: left padding is not counted)
    logits = step(input_ids[:, 0], positions, states)
    cache.seen += 1
    return logits[:, None]
