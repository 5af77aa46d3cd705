"""The registry of parity cases: one record per (model kind, configuration), read by every property.

A :class:`ParityCase` says how to build the reference (legacy) model and the port for a
configuration, which configurations to search (a strategy; a named configuration is a single
point), which inputs to draw, how weights are mapped (``lightning_port.weight_map``), which
tolerances apply (overrides with reasons, on top of :mod:`parity.tolerances`), how many examples
it is worth (full-size models are expensive), and notes for the report. Adding a model variant is
adding one entry to :data:`CASES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from reference import build_model

from . import strategies as S
from .rng import seeded
from .tolerances import FULL_SIZE_OUTPUTS, Tolerance, tolerance_for

# --- named configurations (legacy argument names) ------------------------------------------------
DEFAULT = {  # legacy train.py defaults (the recorded single_default fixture)
    "n_cat_features": 53, "n_num_features": 47, "n_classes": 2, "n_embedding": 1352, "seq_len": 51,
    "n_engineered_num_features": 0, "dim_embedding_table": 128, "dim_attn_feedforward": 64, "use_mlp": 0,
    "num_heads": 1, "dropout": 0.1, "n_layers_order": 6, "n_layers_feature": 6, "emb_tbl_use_bias": 1,
    "use_moe": True, "num_experts": 5, "use_time_seq": True,
}
PRODUCTION = dict(DEFAULT, dim_embedding_table=64, dim_attn_feedforward=256, n_layers_order=6,
                  n_layers_feature=4, use_moe=False, use_time_seq=True)  # legacy-tsa.md section 12
TINY = {  # small MoE model with every feature on (the recorded single_small fixture)
    "n_cat_features": 6, "n_num_features": 5, "n_classes": 2, "n_embedding": 40, "seq_len": 7,
    "n_engineered_num_features": 3, "dim_embedding_table": 8, "dim_attn_feedforward": 16, "use_mlp": 0,
    "num_heads": 2, "dropout": 0.1, "n_layers_order": 2, "n_layers_feature": 2, "emb_tbl_use_bias": 1,
    "use_moe": True, "num_experts": 3, "use_time_seq": True,
}
TINY_DUAL = dict(TINY, seq_len=51, n_engineered_num_features=2)  # seq_len 51: the legacy empty-card literal applies
TINY_PLAIN = {  # no MoE, no time, no bias, 3 classes, 4 heads (the recorded single_plain fixture)
    "n_cat_features": 7, "n_num_features": 6, "n_classes": 3, "n_embedding": 50, "seq_len": 6,
    "n_engineered_num_features": 2, "dim_embedding_table": 8, "dim_attn_feedforward": 12, "use_mlp": 0,
    "num_heads": 4, "dropout": 0.0, "n_layers_order": 1, "n_layers_feature": 3, "emb_tbl_use_bias": 0,
    "use_moe": False, "num_experts": 1, "use_time_seq": False,
}
NAMED_CONFIGS = {"default": DEFAULT, "production": PRODUCTION, "tiny": TINY, "tiny-dual": TINY_DUAL,
                 "tiny-plain": TINY_PLAIN}


def port_class(kind: str):
    from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification

    return TemporalSelfAttentionClassification if kind == "single" else DualSequenceTSA


def port_kwargs(legacy_kwargs: dict, kind: str) -> dict:
    kw = dict(legacy_kwargs)
    kw.pop("return_seq", None)
    return kw


@dataclass(frozen=True)
class ParityCase:
    kind: str  # "single" | "dual"
    config_id: str  # "default", "production", "tiny", ..., or "drawn" (searched)
    configs: Callable[[], st.SearchStrategy[S.ModelConfig]]
    max_batch: int = S.MAX_BATCH_SMALL
    weight: float = 1.0  # share of the profile's example budget (full-size cases are expensive)
    full_size: bool = False
    tolerance_overrides: dict[str, Tolerance] = field(default_factory=dict)
    notes: str = ""

    @property
    def model(self) -> str:
        return f"{self.kind}:{self.config_id}"

    # -- building -----------------------------------------------------------------------------
    def build_reference(self, config: S.ModelConfig, seed: int | None = None) -> torch.nn.Module:
        """The legacy model; with ``seed``, constructed right after ``torch.manual_seed(seed)`` (RNG restored)."""
        if seed is None:
            return build_model(self.kind, **config.kwargs)
        with seeded(seed):
            return build_model(self.kind, **config.kwargs)

    def build_port(self, config: S.ModelConfig, seed: int | None = None, **options):
        """The port LightningModule (legacy-named kwargs + port options such as ``moe_eval_policy``)."""
        cls = port_class(self.kind)
        kw = dict(port_kwargs(config.kwargs, self.kind), **options)
        if seed is None:
            return cls(**kw)
        with seeded(seed):
            return cls(**kw)

    def port_config(self, port):
        return port.config

    def inputs(self, config: S.ModelConfig) -> st.SearchStrategy[S.InputBatch]:
        return S.input_batches(config, self.kind, self.max_batch)

    def tolerance(self, check: str, dtype: torch.dtype = torch.float32) -> Tolerance:
        return self.tolerance_overrides.get(check) or tolerance_for(check, dtype)


def _named(name: str) -> Callable[[], st.SearchStrategy[S.ModelConfig]]:
    return lambda: st.just(S.ModelConfig(dict(NAMED_CONFIGS[name]), name))


def _dual(kw: dict) -> dict:
    out = dict(kw)
    out.pop("use_mlp", None)
    return out


CASES: list[ParityCase] = [
    ParityCase("single", "drawn", lambda: S.model_configs("single"), weight=1.0,
               notes="small configurations over every switch"),
    ParityCase("single", "tiny", _named("tiny"), weight=0.3, notes="MoE, time, bias, 2 heads, engineered"),
    ParityCase("single", "tiny-plain", _named("tiny-plain"), weight=0.3,
               notes="no MoE, no time, no bias, 3 classes, 4 heads"),
    ParityCase("single", "default", _named("default"), max_batch=S.MAX_BATCH_FULL, weight=0.15, full_size=True,
               tolerance_overrides=FULL_SIZE_OUTPUTS,
               notes="legacy default: D 128, 6+6 layers, 5 experts, 53/47 features (4.07M parameters)"),
    ParityCase("single", "production", _named("production"), max_batch=S.MAX_BATCH_FULL, weight=0.15,
               full_size=True, tolerance_overrides=FULL_SIZE_OUTPUTS, notes="suspect-queue production shape: D 64, F 256, 6+4 layers, no MoE"),
    ParityCase("dual", "drawn", lambda: S.model_configs("dual"), weight=0.8,
               notes="small configurations; seq_len 51 included so the empty-card literal applies"),
    ParityCase("dual", "tiny", lambda: st.just(S.ModelConfig(_dual(TINY_DUAL), "tiny")), weight=0.3,
               notes="seq_len 51, MoE, empty and full card histories"),
    ParityCase("dual", "default", lambda: st.just(S.ModelConfig(_dual(DEFAULT), "default")),
               max_batch=S.MAX_BATCH_FULL, weight=0.1, full_size=True, tolerance_overrides=FULL_SIZE_OUTPUTS,
               notes="legacy default configuration"),
]


def case(model: str) -> ParityCase:
    """Look a case up by its report name, e.g. ``"single:tiny"``."""
    for c in CASES:
        if c.model == model:
            return c
    raise KeyError(f"no parity case {model!r}; known: {[c.model for c in CASES]}")
