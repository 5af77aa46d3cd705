"""Port losses vs the legacy losses on extreme logits (the recordings only hold moderate ones)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_port.losses import ASLSingleLabel, CyclicalFocalLoss, FocalLoss
from reference import losses as legacy


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 30.0, 120.0]), classes=st.integers(2, 4))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_match_legacy_including_saturated_softmax(reduction, seed, scale, classes):
    """A softmax that underflows to 0 must not turn the focal loss into inf/NaN (legacy uses log_softmax);
    found by the deep parity profile."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(12, classes, generator=g) * scale).requires_grad_()
    y = torch.randint(0, classes, (12,), generator=g)
    pairs = [
        (FocalLoss(gamma=2.0, alpha=0.25, reduction=reduction), legacy.FocalLoss(gamma=2.0, alpha=0.25, reduction=reduction)),
        (ASLSingleLabel(reduction=reduction), legacy.ASLSingleLabel(reduction=reduction)),
    ]
    for port_fn, legacy_fn in pairs:
        a = port_fn(logits, y)
        (ga,) = torch.autograd.grad(a.sum(), logits)
        b = legacy_fn(logits, y)
        (gb,) = torch.autograd.grad(b.sum(), logits)
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1.3e-6)
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
    cyc_port = CyclicalFocalLoss(epochs=10, reduction=reduction)
    cyc_legacy = legacy.Cyclical_FocalLoss(epochs=10, reduction=reduction)
    torch.testing.assert_close(cyc_port(logits, y, 3), cyc_legacy(logits, y, 3), atol=1e-5, rtol=1.3e-6)
