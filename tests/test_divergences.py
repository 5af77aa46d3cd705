"""Both sides of divergences that no other test shows (docs/divergences.md)."""

import pytest
import torch

from lightning_port.losses import build_loss
from reference.training import set_loss


def test_bce_with_logits_legacy_crashes_port_refuses_clearly():
    """Divergence 10: the legacy loss cannot take 2-class logits with integer targets; the port says so up front."""
    logits, y = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    with pytest.raises((ValueError, RuntimeError)):
        set_loss("BCEWithLogitsLoss")(logits, y)  # legacy: fails inside torch with a shape/dtype error
    with pytest.raises(ValueError, match="BCEWithLogitsLoss"):
        build_loss("BCEWithLogitsLoss")
