"""The TSA model ported to PyTorch Lightning: plain networks in :mod:`lightning_port.nn`,
LightningModules here, the legacy weight map in :mod:`lightning_port.weight_map`."""

from .config import TSAConfig
from .module import DualSequenceTSA, TemporalSelfAttentionClassification

__all__ = ["DualSequenceTSA", "TSAConfig", "TemporalSelfAttentionClassification"]
