"""Config validation and weight-map errors."""

from __future__ import annotations

import pytest
import torch

from lightning_port.config import TSAConfig
from lightning_port.weight_map import (
    WeightMapError,
    dropped_legacy_keys,
    legacy_to_port,
    mapping_rows,
    port_to_legacy,
)
from parity.fixtures import LEGACY_DIR, load_case

BASE = {"n_cat_features": 6, "n_num_features": 5, "n_classes": 2, "n_embedding": 40, "seq_len": 7,
        "dim_embedding_table": 8, "dim_attn_feedforward": 16, "num_heads": 2, "num_experts": 3}


@pytest.mark.parametrize(("change", "words"), [
    ({"num_heads": 3}, "2*dim_embedding_table=16 is not divisible by num_heads=3"),
    ({"dim_embedding_table": 6, "num_heads": 4}, "dim_embedding_table=6 is not divisible by num_heads=4"),
    ({"use_mlp": 1}, "use_mlp=1 is not supported"),
    ({"n_num_features": 41}, "outside the table"),
    ({"n_num_features": 40}, "no table rows for categorical codes"),
    ({"moe_eval_policy": "coin"}, "moe_eval_policy must be one of"),
    ({"batch_invariant": True}, "batch_invariant=True needs a deterministic moe_eval_policy"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"n_classes": 1}, "n_classes must be an integer >= 2"),
    ({"n_cat_features": 0}, "n_cat_features must be an integer >= 1"),
])
def test_impossible_configs_fail_with_one_sentence(change, words):
    with pytest.raises(ValueError, match=".") as info:
        TSAConfig(**{**BASE, **change})
    message = str(info.value)
    assert words in message and "\n" not in message


def test_config_accepts_legacy_int_flags_and_deterministic_batch_invariant():
    cfg = TSAConfig(**{**BASE, "use_moe": 1, "use_time_seq": 0, "batch_invariant": True,
                       "moe_eval_policy": "threshold"})
    assert cfg.use_moe is True and cfg.use_time_seq is False and cfg.dim_order == 16


CASE = load_case(LEGACY_DIR / "single_small")
DUAL = load_case(LEGACY_DIR / "dual_small")


def test_weight_map_names_missing_unexpected_and_misshaped_keys():
    cfg = TSAConfig(**CASE.kwargs)
    sd = dict(CASE.state_dict)
    del sd["clf.0.weight"]
    sd["clf.9.weight"] = torch.zeros(1)
    sd["order_attention.dummy_order"] = torch.zeros(1, 3)
    with pytest.raises(WeightMapError) as info:
        legacy_to_port(sd, cfg)
    msg = str(info.value)
    assert "missing keys clf.0.weight" in msg
    assert "unexpected keys clf.9.weight" in msg
    assert "order_attention.dummy_order (1, 3) != expected (1, 16)" in msg
    assert "\n" not in msg


def test_weight_map_rejects_disagreeing_shared_table_copies():
    cfg = TSAConfig(**CASE.kwargs)
    sd = dict(CASE.state_dict)
    sd["feature_attention.embedding.weight"] = sd["embedding.weight"] + 1
    with pytest.raises(WeightMapError, match="feature_attention.embedding.weight differs from embedding.weight"):
        legacy_to_port(sd, cfg)


def test_port_to_legacy_rejects_wrong_port_keys():
    cfg = TSAConfig(**CASE.kwargs)
    port = legacy_to_port(CASE.state_dict, cfg)
    port.pop("head.fc2.bias")
    with pytest.raises(WeightMapError, match="missing keys head.fc2.bias"):
        port_to_legacy(port, cfg)


def test_dropped_keys_are_exactly_the_never_used_parameters():
    assert dropped_legacy_keys(TSAConfig(**CASE.kwargs), "single") == [
        "feature_attention.layer_norm.bias", "feature_attention.layer_norm.weight", "layer_norm.bias",
        "layer_norm.weight", "order_attention.emb_tbl_bias"]
    assert dropped_legacy_keys(TSAConfig(**DUAL.kwargs), "dual") == [
        "feature_attention.layer_norm.bias", "feature_attention.layer_norm.weight", "gate_emb.emb_tbl_bias",
        "order_attention_ccid.emb_tbl_bias", "order_attention_cid.emb_tbl_bias"]
    assert all(isinstance(r.legacy, str) for r in mapping_rows("dual"))
