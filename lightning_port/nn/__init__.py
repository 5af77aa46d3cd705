"""Plain ``nn.Module`` components of the TSA port (no Lightning here)."""

from .attention import AttentionLayerPostNorm, AttentionLayerPreNorm, MultiheadAttention, TimeEncode
from .blocks import ClassifierHead, FeatureAggregation, FeedForward
from .moe import MixtureOfExperts, expert_capacity
from .networks import DualSequenceNetwork, SingleSequenceNetwork
from .stacks import FeatureAttentionModule, OrderAttentionModule

TemporalMultiheadAttention = MultiheadAttention  # the order stack's attention with use_time=True

__all__ = [
    "AttentionLayerPostNorm", "AttentionLayerPreNorm", "ClassifierHead", "DualSequenceNetwork",
    "FeatureAggregation", "FeatureAttentionModule", "FeedForward", "MixtureOfExperts",
    "MultiheadAttention", "OrderAttentionModule", "SingleSequenceNetwork", "TemporalMultiheadAttention",
    "TimeEncode", "expert_capacity",
]
