"""FeatureAggregation's feature-first chains (row lookup in (n, B, L, D) order, weights on the left) equal the
plain chain -- the legacy layout: embeddings permuted to (B, L, D, n) and six nn.Linear over the last axis --
in value and gradient, for every feature count (the degenerate widths below 32 included: n = 1 gives a
zero-width first layer) and in the recomputed (sliced) training path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_port.nn import blocks
from lightning_port.nn.blocks import FeatureAggregation

TOL = {"rtol": 1e-5, "atol": 1e-6}  # fp32: the same sums in another association order


def _plain_codes(fa, codes, table):
    x = F.embedding(codes, table, padding_idx=0).transpose(-1, -2)  # (B, L, D, n), legacy layout
    return fa(x)[..., 0]


def _plain_num(fa, rows, values):
    x = (rows * values[..., None]).transpose(-1, -2)  # (B, L, D, n)
    return fa(x)[..., 0]


@pytest.mark.parametrize("recomputed", [False, True], ids=["stored", "recomputed-in-slices"])
@pytest.mark.parametrize("n", [1, 2, 5, 33, 53])
def test_feature_first_chains_equal_the_plain_chain(n, recomputed, monkeypatch):
    monkeypatch.setattr(blocks, "RECOMPUTE_CHUNK_BYTES", 1)  # as many D slices as possible
    torch.manual_seed(n)
    fa = FeatureAggregation(n)
    table = torch.randn(9, 6, requires_grad=True)
    rows = torch.randn(n, 6, requires_grad=True)
    codes = torch.randint(0, 9, (3, 4, n))
    values = torch.randn(3, 4, n)
    if recomputed:
        got = (fa.aggregate_codes_recomputed(codes, table), fa.project_embeddings_recomputed(rows, values))
    else:
        got = (fa.aggregate_codes(codes, table), fa.project_embeddings(rows, values))
    want = (_plain_codes(fa, codes, table), _plain_num(fa, rows, values))
    inputs = [table, rows, *fa.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    weights = torch.randn(3, 4, 6)
    g_got = torch.autograd.grad(sum((x * weights).sum() for x in got), inputs, allow_unused=True)
    g_want = torch.autograd.grad(sum((x * weights).sum() for x in want), inputs, allow_unused=True)
    for a, b in zip(g_got, g_want):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        torch.testing.assert_close(a.expand_as(b) if a.dim() == 0 else a, b, **TOL)
    assert torch.count_nonzero(g_got[0][0]) == 0  # the padding row gets no gradient
