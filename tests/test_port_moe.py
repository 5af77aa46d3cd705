"""Mixture of experts: index dispatch equals the legacy one-hot dispatch; deterministic policies;
batch-invariant mode; the dual model's masked card path equals the subset path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _port_helpers import case_params, forward_args, loaded_network, rows

from lightning_port.nn import MixtureOfExperts, expert_capacity
from lightning_port.nn.moe import CAPACITY_FACTOR_EVAL, CAPACITY_FACTOR_TRAIN


def one_hot_moe(moe: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """The legacy (Shazeer / tensor2tensor) dense dispatch, written out for comparison."""
    b, n, d = x.shape
    e = moe.num_experts
    raw = torch.einsum("bnd,de->bne", x, moe.w_gate).softmax(-1)
    g1, i1 = raw.topk(1, dim=-1)
    g1, i1 = g1[..., 0], i1[..., 0]
    m1 = F.one_hot(i1, e).float()
    g2, i2 = (raw * (1 - m1)).topk(1, dim=-1)
    g2, i2 = g2[..., 0], i2[..., 0]
    m2 = F.one_hot(i2, e).float()
    denom = g1 + g2 + 1e-9
    g1, g2 = g1 / denom, g2 / denom
    m2 = m2 * (torch.zeros_like(g2).uniform_(0.0, 1.0) < g2 / 0.2).float().unsqueeze(-1)
    cf = CAPACITY_FACTOR_TRAIN if moe.training else CAPACITY_FACTOR_EVAL
    cap = max(min(n, int(n * cf / e)), 4)
    pos1 = (torch.cumsum(m1, dim=-2) - m1) * m1
    m1 = m1 * (pos1 < cap).float()
    count1 = m1.sum(dim=-2, keepdim=True)
    p1 = pos1.sum(-1)
    g1 = g1 * m1.sum(-1)
    pos2 = (torch.cumsum(m2, dim=-2) - m2 + count1) * m2
    m2 = m2 * (pos2 < cap).float()
    p2 = pos2.sum(-1)
    g2 = g2 * m2.sum(-1)
    combine = (g1[..., None, None] * F.one_hot(i1, e)[..., None] * F.one_hot(p1.long(), cap + 2 * n)[..., None, :cap]
               + g2[..., None, None] * F.one_hot(i2, e)[..., None] * F.one_hot(p2.long(), cap + 2 * n)[..., None, :cap])
    dispatch = combine.bool().to(combine)
    expert_in = torch.einsum("bnd,bnec->ebcd", x, dispatch).reshape(e, -1, d)
    out = torch.relu(expert_in @ moe.w1) @ moe.w2
    return torch.einsum("ebcd,bnec->bnd", out.reshape(e, b, cap, d), combine)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("batch", "experts"), [(3, 2), (40, 3), (64, 5)])
def test_index_dispatch_equals_one_hot_dispatch(training, batch, experts):
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, 16, experts).train(training)
    x = torch.randn(5, batch, 8, requires_grad=True)
    torch.manual_seed(1)
    ours = moe(x)
    torch.manual_seed(1)
    ref = one_hot_moe(moe, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours.square().sum(), [x, moe.w_gate, moe.w1, moe.w2])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, moe.w_gate, moe.w1, moe.w2])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_integer_formula_matches_legacy_float_formula():
    for n in range(1, 700):
        for e in range(1, 9):
            for cf in (1.25, 2.0):
                assert expert_capacity(n, cf, e) == max(min(n, int(n * cf / e)), 4)
                assert int(expert_capacity(torch.tensor(n), cf, e)) == expert_capacity(n, cf, e)


SMALL = [p for p in case_params() if not p.values[0].full_size and p.values[0].kwargs["use_moe"]]


@pytest.mark.parametrize("policy", ["threshold", "expected", "all", "none"])
@pytest.mark.parametrize("case", SMALL)
def test_deterministic_policies_draw_nothing_and_repeat(case, policy):
    net = loaded_network(case, moe_eval_policy=policy).eval()
    with torch.no_grad():
        torch.manual_seed(7)
        a, _ = net(*forward_args(case))
        state = torch.get_rng_state()
        b, _ = net(*forward_args(case))
        assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", SMALL)
def test_batch_invariant_row_scores_do_not_depend_on_the_batch(case):
    net = loaded_network(case, moe_eval_policy="threshold", batch_invariant=True).eval()
    n = case.batch_size
    with torch.no_grad():
        full, _ = net(*forward_args(case))
        for i in range(n):
            alone, _ = net(*forward_args(case, rows(case.inputs, slice(i, i + 1))))
            torch.testing.assert_close(alone[0], full[i], rtol=1e-5, atol=1e-6)
        rev = torch.arange(n - 1, -1, -1)
        reversed_scores, _ = net(*forward_args(case, rows(case.inputs, rev)))
        torch.testing.assert_close(reversed_scores, full[rev], rtol=1e-5, atol=1e-6)


DUAL = [p for p in case_params() if p.values[0].kind == "dual"]


@pytest.mark.parametrize("policy", ["threshold", "expected"])
@pytest.mark.parametrize("case", DUAL)
def test_dual_masked_card_path_equals_subset_path(case, policy):
    subset = loaded_network(case, moe_eval_policy=policy).eval()
    masked = loaded_network(case, moe_eval_policy=policy).eval()
    masked.card_rows = "masked"
    with torch.no_grad():
        a, ea = subset(*forward_args(case))
        b, eb = masked(*forward_args(case))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_experts", [1, 2, 3])
def test_output_memory_layout_matches_legacy_so_dropout_masks_line_up(num_experts):
    """The dropout after the MoE draws its mask in memory order: with one expert the legacy einsum returns a
    (T, d, B)-ordered tensor, so the port must hand dropout the same layout (found by the parity suite)."""
    from lightning_port.nn.moe import MixtureOfExperts
    from reference.mixture_of_experts import MoE

    legacy = MoE(dim=8, num_experts=num_experts, hidden_dim=4).train()
    port = MixtureOfExperts(8, 4, num_experts).train()
    port.w_gate.data = legacy.gate.w_gating.data.clone()
    port.w1.data, port.w2.data = legacy.experts.w1.data.clone(), legacy.experts.w2.data.clone()
    x = torch.randn(3, 5, 8)
    torch.manual_seed(1)
    a = torch.nn.functional.dropout(legacy(x)[0], 0.5)
    torch.manual_seed(1)
    b = torch.nn.functional.dropout(port(x), 0.5)
    assert a.stride() == b.stride()
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", [c for c in case_params() if not c.values[0].full_size])
def test_fused_eval_attention_is_opt_in_and_computes_the_same_function(case, monkeypatch):
    """``fused_eval_attention=True`` routes eval attention through SDPA with the separable time factor;
    off by default. Both give the same scores to fp32 rounding."""
    import lightning_port.nn.attention as attention
    from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification
    from lightning_port.weight_map import legacy_to_port

    fx = case
    cls = TemporalSelfAttentionClassification if fx.kind == "single" else DualSequenceTSA
    calls = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for fused in (False, True):
        m = cls(**fx.kwargs, fused_eval_attention=fused).eval()
        m.network.load_state_dict(legacy_to_port(fx.state_dict, m.config, fx.kind))
        with torch.no_grad():
            torch.manual_seed(7)
            out[fused] = m(*forward_args(fx))[0]
        assert bool(calls) == fused
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-4)
