"""The legacy TSA model and its training semantics, reproduced exactly (legacy names and quirks kept)."""

from .losses import ASLSingleLabel, Cyclical_FocalLoss, FocalLoss
from .models import OrderFeatureAttentionClassifier, TwoSeqMoEOrderFeatureAttentionClassifier, build_model

__all__ = [
    "ASLSingleLabel",
    "Cyclical_FocalLoss",
    "FocalLoss",
    "OrderFeatureAttentionClassifier",
    "TwoSeqMoEOrderFeatureAttentionClassifier",
    "build_model",
]
