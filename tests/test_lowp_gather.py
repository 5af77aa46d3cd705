"""Under ``torch.autocast`` the aggregation chains gather the embedding rows in autocast's dtype (cast the table,
then gather: ``blocks._LowpGather``) instead of gathering in fp32 and letting the first Linear cast the gathered
tensor. The claim: the same values and gradients bit for bit, with the large fp32 copy gone. Both sides computed
here: the plain gather (``_autocast_dtype`` forced to ``None``) and the low-precision one."""

from __future__ import annotations

import pytest
import torch

from lightning_port.nn import blocks


def _run(agg, codes, table, method, feature_first, dtype):
    t = table.detach().clone().requires_grad_(True)
    agg.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        out = getattr(agg, method)(codes, t, 0, feature_first=feature_first)
    out.float().pow(2).sum().backward()
    return out, t.grad, [p.grad.clone() for p in agg.parameters() if p.grad is not None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature_first", [True, False])
@pytest.mark.parametrize("method", ["aggregate_codes", "aggregate_codes_recomputed"])
def test_low_precision_gather_is_bit_equal_to_the_plain_gather(monkeypatch, dtype, feature_first, method):
    g = torch.Generator().manual_seed(0)
    n, N, D = 40, 30, 16
    torch.manual_seed(0)
    agg = blocks.FeatureAggregation(n)
    table = torch.randn(N, D, generator=g)
    codes = torch.randint(0, N, (4, 7, n), generator=g)
    codes[0, :3] = 0  # padding rows: read, no gradient
    low = _run(agg, codes, table, method, feature_first, dtype)
    calls = []
    real = blocks._LowpGather.apply
    monkeypatch.setattr(blocks._LowpGather, "apply", lambda *a: calls.append(1) or real(*a))
    _run(agg, codes, table, method, feature_first, dtype)
    assert calls, "the low-precision gather was not used under autocast"
    monkeypatch.setattr(blocks, "_autocast_dtype", lambda t: None)
    plain = _run(agg, codes, table, method, feature_first, dtype)
    assert low[0].dtype == plain[0].dtype == dtype
    assert torch.equal(low[0], plain[0])
    assert torch.equal(low[1], plain[1])  # the table's gradient, accumulated in fp32 on both sides
    assert low[1][0].abs().max() == 0  # padding row
    assert len(low[2]) == len(plain[2]) and all(torch.equal(a, b) for a, b in zip(low[2], plain[2]))


def test_without_autocast_the_plain_gather_runs():
    t = torch.randn(5, 3)
    assert blocks._autocast_dtype(t) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert blocks._autocast_dtype(t) == torch.bfloat16
        assert blocks._autocast_dtype(t.double()) is None  # only fp32 tables are cast by autocast's Linear
