"""The port against the recorded legacy fixtures, for every case (shipped and held-out)."""

from __future__ import annotations

import pytest
import torch
from _port_helpers import (
    GRAD_ATOL_FLOOR,
    GRAD_ATOL_SCALE,
    GRAD_RTOL,
    OUTPUT_TOL,
    case_params,
    forward_args,
    loaded_network,
    network_class,
)

from lightning_port.config import TSAConfig
from lightning_port.losses import ASLSingleLabel, CyclicalFocalLoss, FocalLoss
from lightning_port.weight_map import dropped_legacy_keys, legacy_to_port, port_to_legacy


@pytest.mark.parametrize("case", case_params())
def test_seeded_init_maps_to_model_pt_exactly(case):
    cfg = TSAConfig(**case.kwargs)
    torch.manual_seed(case.init_seed)
    net = network_class(case)(cfg)
    expected = legacy_to_port(case.state_dict, cfg, case.kind)
    assert net.state_dict().keys() == expected.keys()
    for key, value in net.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("case", case_params())
def test_weight_map_round_trip(case):
    cfg = TSAConfig(**case.kwargs)
    port = legacy_to_port(case.state_dict, cfg, case.kind)
    back = port_to_legacy(port, cfg, case.kind)
    assert back.keys() == case.state_dict.keys()
    dropped = set(dropped_legacy_keys(cfg, case.kind))
    for key, value in case.state_dict.items():
        assert back[key].shape == value.shape, key
        if key in dropped:
            assert not back[key].any(), key
        else:
            assert torch.equal(back[key], value), key


@pytest.mark.parametrize("case", case_params())
def test_eval_outputs_match_seeds_7_and_8(case):
    net = loaded_network(case).eval()
    with torch.no_grad():
        torch.manual_seed(7)
        scores7, ensemble7 = net(*forward_args(case))
        torch.manual_seed(8)
        scores8, _ = net(*forward_args(case))
    exp = case.expected
    torch.testing.assert_close(scores7, exp["eval_seed7_scores"], **OUTPUT_TOL)
    torch.testing.assert_close(ensemble7, exp["eval_seed7_ensemble"], **OUTPUT_TOL)
    torch.testing.assert_close(scores8, exp["eval_seed8_scores"], **OUTPUT_TOL)


def _grad_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=GRAD_RTOL,
                               atol=max(GRAD_ATOL_FLOOR, GRAD_ATOL_SCALE * scale), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", case_params(slow_full_size=True))
def test_train_seed9_scores_loss_and_every_gradient(case):
    net = loaded_network(case).train()
    torch.manual_seed(9)
    scores, _ = net(*forward_args(case))
    loss = torch.nn.CrossEntropyLoss(reduction="sum")(scores, case.inputs["y"])
    loss.backward()
    exp = case.expected
    torch.testing.assert_close(scores, exp["train_seed9_scores"], **OUTPUT_TOL)
    torch.testing.assert_close(loss, exp["train_seed9_loss"], **OUTPUT_TOL)
    cfg = TSAConfig(**case.kwargs)
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in net.named_parameters()}
    legacy_grads = port_to_legacy(grads, cfg, case.kind)
    dropped = set(dropped_legacy_keys(cfg, case.kind))
    recorded = exp.get("train_seed9_grads") or exp["train_seed9_grad_summary"]
    for key, value in recorded.items():
        if value is None:  # the legacy parameter got no gradient: it must be one the port drops
            assert key in dropped, key
            continue
        g = legacy_grads[key]
        if "train_seed9_grads" in exp:
            _grad_close(g, value, key)
        else:  # [norm, sum, abs-max]
            summary = torch.stack([g.norm(), g.sum(), g.abs().max()]) if g.numel() else torch.zeros(3)
            _grad_close(summary, value, key)


@pytest.mark.parametrize("case", case_params())
def test_every_recorded_loss(case):
    exp, y = case.expected, case.inputs["y"]
    scores = exp["eval_seed7_scores"]
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(FocalLoss(gamma=2, alpha=0.25, reduction="mean")(scores, y), exp["loss_focal_mean"], **tol)
    torch.testing.assert_close(FocalLoss(gamma=2, alpha=0.25, reduction="sum")(scores, y), exp["loss_focal_sum"], **tol)
    cyc = CyclicalFocalLoss(gamma_pos=0, gamma_neg=4, gamma_hc=0, epochs=10, factor=2, reduction="sum")
    for epoch in (0, 3, 9):
        torch.testing.assert_close(cyc(scores, y, epoch), exp[f"loss_cyclical_focal_sum_epoch{epoch}"], **tol)
    torch.testing.assert_close(ASLSingleLabel(gamma_pos=0, gamma_neg=4)(scores, y),
                               exp["loss_asl_single_label_mean"], **tol)
