"""linear_transformers: "Transformers are RNNs" (Katharopoulos et al., ICML 2020) in PyTorch.

Linear attention through kernel feature maps, trained in parallel and run as an RNN for
generation with the same weights.
"""

from . import feature_maps, ops
from .attention import ATTENTION_KINDS, AttentionLayer
from .feature_maps import FEATURE_MAPS, FeatureMap, make_feature_map
from .ops import (
    KVCache,
    LinearState,
    causal_linear_attention,
    linear_attention,
    linear_attention_step,
    softmax_attention,
    softmax_attention_step,
    softmax_attention_with_cache,
)

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_KINDS",
    "FEATURE_MAPS",
    "AttentionLayer",
    "FeatureMap",
    "KVCache",
    "LinearState",
    "causal_linear_attention",
    "feature_maps",
    "linear_attention",
    "linear_attention_step",
    "make_feature_map",
    "ops",
    "softmax_attention",
    "softmax_attention_step",
    "softmax_attention_with_cache",
]
