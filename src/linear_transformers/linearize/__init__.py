"""Turning a pretrained softmax transformer into an RNN (linearisation): learned feature maps, the
sliding-window hybrid with attention sinks, attention transfer. See convert.py and attention.py."""

from .attention import HedgehogFeatureMap, HybridState, hybrid_attention, step_attention
from .convert import LinearizeConfig, LinearizedAttention, LinearizedCache, feature_map_parameters, linearize

__all__ = [
    "HedgehogFeatureMap",
    "HybridState",
    "LinearizeConfig",
    "LinearizedAttention",
    "LinearizedCache",
    "feature_map_parameters",
    "hybrid_attention",
    "linearize",
    "step_attention",
]
