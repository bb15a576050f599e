"""A linearised Llama as a transformers model of its own type, "linear_llama": a folder written by
`save_linearized` loads with `AutoModelForCausalLM.from_pretrained(folder)` (no trust_remote_code;
importing linear_transformers.linearize registers the type), and `generate()` (greedy, sampling,
beam search) runs it as an RNN through `LinearizedCache`, unbounded by any training length: RoPE is
computed for any position and the state does not grow.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..decode import DecodeConfig
from .convert import LinearizeConfig, LinearizedCache, linearize
from .step import fused_logits, weights_fixed

MODEL_TYPE = "linear_llama"


class LinearLlamaConfig(LlamaConfig):
    """LlamaConfig plus `linearize`: the LinearizeConfig as a dict (mode, feature map, window, sinks, eps)."""

    model_type = MODEL_TYPE

    def __init__(self, linearize: dict | None = None, **kwargs) -> None:
        self.linearize = dict(linearize or LinearizeConfig().to_dict())
        super().__init__(**kwargs)


class LinearLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose attention layers are linearised (LinearizedAttention) at construction."""

    config_class = LinearLlamaConfig

    def __init__(self, config: LinearLlamaConfig) -> None:
        super().__init__(config)
        linearize(self, LinearizeConfig(**config.linearize))
        self.post_init()

    decode_config = DecodeConfig()  # how generation steps on the CPU (set an instance's to change it)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """LlamaForCausalLM's forward; one new token per row after a prefill (generate()'s steps) runs
        through the fused C step where it applies (step.fused_logits; self.decode_config chooses it
        and its weight format), the same logits. attention_mask [B, past + T]: 0 at left padding
        (each padded row computes what it computes alone; positions follow the mask when
        position_ids are not given); right padding only where no recurrent state is kept."""
        if cache is None:  # (transformers' deprecated name for it, still accepted)
            cache = kwargs.pop("past_key_values", None)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            kwargs["padding_start"], position_ids = padding_of(attention_mask, B, T, cache, position_ids)
        logits = fused_logits(self, input_ids, position_ids, cache, inputs_embeds, labels, kwargs)
        if logits is not None:
            return CausalLMOutputWithPast(logits=logits, cache=cache)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def generate(self, *args, **kwargs):
        """transformers' generate(); the fused step's weights are checked once per call, not per token
        (step.weights_fixed: nothing changes them between its tokens)."""
        with weights_fixed(self):
            return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """generate() keeps a recurrent state, not a key/value cache."""
        given = model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None
        if not given and generation_config.use_cache is not False:
            model_kwargs["cache"] = LinearizedCache()


def padding_of(attention_mask: torch.Tensor, B: int, T: int, cache, position_ids):
    """(start [B]: where each row's tokens begin, position_ids) of a 2-D attention_mask with zeros;
    a one-line ValueError for padding the recurrent state cannot hold."""
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(
            f"linear_llama: attention_mask must be [B, past + T] (B = {B}, T = {T}), got {list(attention_mask.shape)}"
        )
    keep = attention_mask.bool()
    if position_ids is None:  # (a padded row's tokens count from its first, as generate() numbers them)
        position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    new = keep[:, -T:]
    stepping = isinstance(cache, LinearizedCache) and len(cache.states) > 0
    if stepping:
        if not bool(new.all()):
            raise ValueError(
                "linear_llama: padding after the prompt (zeros in attention_mask's new tokens); pad prompts on the left"
            )
        return None, position_ids
    index = torch.arange(T, device=new.device)
    count = new.sum(1)
    start = torch.where(count > 0, new.long().argmax(1), T)  # each row's first token (T: none)
    runs = (index >= start[:, None]) & (index < (start + count)[:, None])
    if not bool((runs == new).all()):
        row = int((runs != new).any(1).nonzero()[0])
        raise ValueError(f"linear_llama: attention_mask row {row} has padding inside it; pad on the left")
    if isinstance(cache, LinearizedCache) and bool((start + count < T).any()):
        row = int((start + count < T).nonzero()[0])
        raise ValueError(
            f"linear_llama: attention_mask row {row} is padded on the right, which the recurrent state would "
            "take in; pad prompts on the left"
        )
    return start.to(torch.int64), position_ids  # (right padding without a state: causal, never seen)


def from_linearized(model: LlamaForCausalLM) -> LinearLlamaForCausalLM:
    """The linear_llama model holding `model`'s weights (a Llama that `linearize` converted)."""
    fields = model.config.to_dict()
    # (the weights are dense float32 here, whatever file the teacher was read from: a GGUF teacher's
    # quantization_config would make transformers refuse to save, and mislead a loader)
    for key in ("model_type", "architectures", "transformers_version", "quantization_config"):
        fields.pop(key, None)
    config = LinearLlamaConfig(**fields)
    out = LinearLlamaForCausalLM(config)
    out.load_state_dict(model.state_dict())
    return out.eval()


def save_linearized(model: LlamaForCausalLM, folder: str | Path, tokenizer=None) -> Path:
    """Write a linearised Llama (and its teacher's tokenizer) as a transformers folder."""
    folder = Path(folder)
    plain = isinstance(model, LinearLlamaForCausalLM) and getattr(model.config, "quantization_config", None) is None
    hf = model if plain else from_linearized(model)
    hf.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


AutoConfig.register(MODEL_TYPE, LinearLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearLlamaConfig, LinearLlamaForCausalLM, exist_ok=True)
