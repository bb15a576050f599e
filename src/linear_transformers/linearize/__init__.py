"""Turning a pretrained softmax transformer into an RNN (linearisation): learned feature maps, the
sliding-window hybrid with attention sinks, attention transfer. See convert.py and attention.py."""

from .attention import HybridState, hybrid_attention, step_attention
from .convert import LinearizeConfig, LinearizedAttention, LinearizedCache, feature_map_parameters, linearize
from .generate import RecurrentGenerator, generate
from .hf import LinearLlamaConfig, LinearLlamaForCausalLM, from_linearized, save_linearized

__all__ = [
    "HybridState",
    "LinearLlamaConfig",
    "LinearLlamaForCausalLM",
    "LinearizeConfig",
    "LinearizedAttention",
    "LinearizedCache",
    "RecurrentGenerator",
    "feature_map_parameters",
    "from_linearized",
    "generate",
    "hybrid_attention",
    "linearize",
    "save_linearized",
    "step_attention",
]
