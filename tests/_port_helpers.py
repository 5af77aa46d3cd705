"""Shared helpers for the lightning_port tests: fixture cases -> port networks and inputs."""

from __future__ import annotations

import pytest
import torch

from lightning_port.config import TSAConfig
from lightning_port.nn import DualSequenceNetwork, SingleSequenceNetwork
from lightning_port.weight_map import legacy_to_port
from parity.fixtures import LegacyCase, all_cases

# fp32 tolerances (rtol, atol) for comparisons with the recorded legacy outputs
OUTPUT_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_RTOL = 1e-3
GRAD_ATOL_FLOOR = 1e-6  # absolute noise floor for gradients (fp32 summation order)
GRAD_ATOL_SCALE = 1e-5  # ... or this share of the tensor's largest recorded gradient


def case_params(slow_full_size: bool = False) -> list:
    """Every recorded case (shipped and TSA_LEGACY_FIXTURES), as pytest params."""
    out = []
    for case in all_cases():
        marks = [pytest.mark.slow] if slow_full_size and case.full_size else []
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def network_class(case: LegacyCase):
    return SingleSequenceNetwork if case.kind == "single" else DualSequenceNetwork


def loaded_network(case: LegacyCase, **overrides) -> torch.nn.Module:
    cfg = TSAConfig(**{**case.kwargs, **overrides})
    net = network_class(case)(cfg)
    net.load_state_dict(legacy_to_port(case.state_dict, cfg, case.kind))
    return net


def forward_args(case: LegacyCase, inputs: dict | None = None) -> tuple:
    i = case.inputs if inputs is None else inputs
    if case.kind == "single":
        return (i["x_cat"], i["x_num"], i.get("x_engineered"), i["time_seq"], None, i["key_padding_mask"])
    return (i["x_seq_cat_cid"], i["x_seq_num_cid"], i["time_seq_cid"], i["x_seq_cat_ccid"],
            i["x_seq_num_ccid"], i["time_seq_ccid"], i.get("x_engineered"), None,
            i["key_padding_mask_cid"], i["key_padding_mask_ccid"])


def lightning_batch(case: LegacyCase) -> dict:
    """The case inputs in the legacy dataset's dict format."""
    i = case.inputs
    batch = {"y": i["y"]}
    if "x_engineered" in i:
        batch["x_engineered_num"] = i["x_engineered"]
    suffixes = ("",) if case.kind == "single" else ("_cid", "_ccid")
    for s in suffixes:
        src = "x_cat" if case.kind == "single" else "x_seq_cat" + s
        batch["x_seq_cat" + s] = i[src]
        batch["x_seq_num" + s] = i["x_num" if case.kind == "single" else "x_seq_num" + s]
        batch["time_to_last" + s] = i["time_seq" + s]
        batch["not_padded" + s] = i["not_padded" + s]
    return batch


def rows(inputs: dict, index) -> dict:
    """Select batch rows of every tensor in a case's input dict."""
    return {k: v[index] for k, v in inputs.items()}
