"""Hypothesis strategies for the parity properties: model configurations and input batches.

Strategies are nouns returning small records. Choices are ordered so that a failing example
shrinks towards the simplest configuration (few features, one layer, no MoE, no time, batch 1).
Tensors are generated from a drawn seed (hypothesis controls the structure: sizes, padding,
time range; the seed controls the values), so an example stays cheap and reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

# Size limits (named, so the report can say what was searched).
MAX_BATCH_SMALL = 8
MAX_BATCH_FULL = 4
SMALL_FEATURES = (1, 8)  # below 32: the feature-aggregation MLP is degenerate (output = last bias)
WIDE_FEATURES = (32, 40)  # 32 and above: every aggregation layer has width >= 1
MAX_TIME = 1e7  # legacy safe domain: exp overflows for time gaps above ~8.8e7
TIME_SCALES = (0.0, 1.0, 1e3, 1e6, MAX_TIME)
LEGACY_EMPTY_CARD_SEQ_LEN = 51  # legacy literal 50 == seq_len - 1 only at seq_len 51

LEGACY_KWARGS = (
    "n_cat_features", "n_num_features", "n_classes", "n_embedding", "seq_len", "n_engineered_num_features",
    "dim_embedding_table", "dim_attn_feedforward", "use_mlp", "num_heads", "dropout", "n_layers_order",
    "n_layers_feature", "emb_tbl_use_bias", "use_moe", "num_experts", "use_time_seq",
)


@dataclass(frozen=True)
class ModelConfig:
    """Legacy constructor keyword arguments (legacy names), plus a short id for reports."""

    kwargs: dict
    config_id: str = "drawn"

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.kwargs.items())))

    @property
    def seq_len(self) -> int:
        return int(self.kwargs["seq_len"])

    def short(self) -> str:
        k = self.kwargs
        return (f"cat{k['n_cat_features']}/num{k['n_num_features']}/eng{k['n_engineered_num_features']} "
                f"D{k['dim_embedding_table']} F{k['dim_attn_feedforward']} H{k['num_heads']} "
                f"L{k['n_layers_order']}/{k['n_layers_feature']} moe{int(bool(k['use_moe']))}x{k['num_experts']} "
                f"time{int(bool(k['use_time_seq']))} bias{k['emb_tbl_use_bias']} C{k['n_classes']} "
                f"seq{k['seq_len']} p{k['dropout']}")


def _features() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(*SMALL_FEATURES), st.integers(*WIDE_FEATURES))


@st.composite
def model_configs(draw, kind: str = "single") -> ModelConfig:
    """Small configurations over every switch (MoE, time, bias, heads, feature counts below and
    above 32, engineered 0..3, 2-4 classes). Dual configs use seq_len 51 or a short one."""
    n_cat, n_num = draw(_features()), draw(_features())
    D = draw(st.sampled_from([4, 8, 12]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if D % h == 0]))
    use_moe = draw(st.booleans())
    seq_choices = [3, 6, LEGACY_EMPTY_CARD_SEQ_LEN] if kind == "dual" else [2, 5, 8]
    kwargs = {
        "n_cat_features": n_cat,
        "n_num_features": n_num,
        "n_classes": draw(st.integers(2, 4)),
        "n_embedding": n_num + draw(st.integers(2, 30)),
        "seq_len": draw(st.sampled_from(seq_choices)),
        "n_engineered_num_features": draw(st.integers(0, 3)),
        "dim_embedding_table": D,
        "dim_attn_feedforward": draw(st.sampled_from([4, 8, 16])),
        "use_mlp": 0,
        "num_heads": heads,
        "dropout": draw(st.sampled_from([0.0, 0.1, 0.5])),
        "n_layers_order": draw(st.integers(1, 2)),
        "n_layers_feature": draw(st.integers(1, 2)),
        "emb_tbl_use_bias": draw(st.sampled_from([0, 1])),
        "use_moe": use_moe,
        "num_experts": draw(st.integers(1, 4)) if use_moe else 1,
        "use_time_seq": draw(st.booleans()),
    }
    return ModelConfig(kwargs, "drawn")


@dataclass
class InputBatch:
    """One batch in the legacy dataset's dict format, and how it was made (for reproduction)."""

    batch: dict[str, torch.Tensor]
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.batch["y"].shape[0])

    def rows(self, idx) -> InputBatch:
        return InputBatch({k: v[idx] for k, v in self.batch.items()}, dict(self.recipe, rows=str(idx)))


def _sequence(gen: torch.Generator, lengths: list[int], L: int, n_cat: int, n_num: int, n_codes: int,
              time_scale: float) -> dict[str, torch.Tensor]:
    """Left-padded histories: row b has its last ``lengths[b]`` positions present."""
    B = len(lengths)
    pos = torch.arange(L)[None, :]
    present = pos >= (L - torch.tensor(lengths)[:, None])  # (B, L)
    codes = torch.randint(1, n_codes + 1, (B, L, n_cat), generator=gen).float()
    nums = torch.randn(B, L, n_num, generator=gen)
    # time_to_last: older transactions have larger values, the current one 0, padding 0
    gaps = torch.rand(B, L, generator=gen) * time_scale / max(L, 1)
    times = gaps.flip(1).cumsum(1).flip(1) - gaps  # decreasing to 0 at the last position
    mask3 = present[..., None]
    return {
        "x_seq_cat": codes * mask3,
        "x_seq_num": nums * mask3,
        "time_to_last": (times * present)[..., None].float(),
        "not_padded": present.float(),
    }


def _lengths(L: int, max_batch: int, dual_card: bool = False) -> st.SearchStrategy[list[int]]:
    special = [L, 0] + ([1] if dual_card else []) + [max(L // 2, 1)]
    length = st.one_of(st.sampled_from(special), st.integers(0, L))
    return st.lists(length, min_size=1, max_size=max_batch)


@st.composite
def input_batches(draw, config: ModelConfig, kind: str = "single", max_batch: int = MAX_BATCH_SMALL) -> InputBatch:
    """A batch for ``config``: batch size 1..max_batch; per-row history lengths including full,
    fully padded and (dual) empty card histories (only the current order present); time range
    0..1e7; values from a drawn seed."""
    k = config.kwargs
    L = config.seq_len
    lengths = draw(_lengths(L, max_batch), label="lengths")
    B = len(lengths)
    time_scale = draw(st.sampled_from(TIME_SCALES), label="time_scale")
    seed = draw(st.integers(0, 2**31 - 1), label="data_seed")
    gen = torch.Generator().manual_seed(seed)
    n_codes = k["n_embedding"] - k["n_num_features"]
    recipe = {"lengths": lengths, "time_scale": time_scale, "data_seed": seed}
    batch: dict[str, torch.Tensor] = {}
    if kind == "single":
        batch.update(_sequence(gen, lengths, L, k["n_cat_features"], k["n_num_features"], n_codes, time_scale))
    else:
        card = draw(st.lists(st.one_of(st.sampled_from([1, L, 0]), st.integers(0, L)), min_size=B, max_size=B),
                    label="card_lengths")
        recipe["card_lengths"] = card
        for sfx, lens in (("_cid", lengths), ("_ccid", card)):
            seq = _sequence(gen, lens, L, k["n_cat_features"], k["n_num_features"], n_codes, time_scale)
            batch.update({key + sfx: v for key, v in seq.items()})
    batch["x_engineered_num"] = torch.randn(B, k["n_engineered_num_features"], generator=gen)
    batch["y"] = torch.randint(0, k["n_classes"], (B,), generator=gen)
    return InputBatch(batch, recipe)


def make_batch(config: ModelConfig, kind: str, lengths: list[int], seed: int, time_scale: float = 1e6,
               card_lengths: list[int] | None = None) -> InputBatch:
    """The same construction as :func:`input_batches`, outside hypothesis (findings, tests)."""
    k = config.kwargs
    L = config.seq_len
    gen = torch.Generator().manual_seed(seed)
    n_codes = k["n_embedding"] - k["n_num_features"]
    batch: dict[str, torch.Tensor] = {}
    if kind == "single":
        batch.update(_sequence(gen, lengths, L, k["n_cat_features"], k["n_num_features"], n_codes, time_scale))
    else:
        card = card_lengths if card_lengths is not None else lengths
        for sfx, lens in (("_cid", lengths), ("_ccid", card)):
            seq = _sequence(gen, lens, L, k["n_cat_features"], k["n_num_features"], n_codes, time_scale)
            batch.update({key + sfx: v for key, v in seq.items()})
    B = len(lengths)
    batch["x_engineered_num"] = torch.randn(B, k["n_engineered_num_features"], generator=gen)
    batch["y"] = torch.randint(0, k["n_classes"], (B,), generator=gen)
    return InputBatch(batch, {"lengths": lengths, "data_seed": seed, "time_scale": time_scale,
                              "card_lengths": card_lengths})


@dataclass(frozen=True)
class LossDraw:
    logits: torch.Tensor
    target: torch.Tensor
    recipe: dict


@st.composite
def loss_inputs(draw) -> LossDraw:
    """Logits (B 1..16, C 2..4) at scales from 1e-3 to 30 (saturated softmax), and targets."""
    B = draw(st.integers(1, 16))
    C = draw(st.integers(2, 4))
    scale = draw(st.sampled_from([1.0, 1e-3, 5.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=gen) * scale
    target = torch.randint(0, C, (B,), generator=gen)
    return LossDraw(logits, target, {"B": B, "C": C, "scale": scale, "seed": seed})


@st.composite
def score_arrays(draw) -> tuple:
    """Scores in [0, 1] (float32, with ties, exact 0/1 and tiny values) and binary labels with both classes."""
    n = draw(st.integers(2, 400))
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=gen)
    if ties:
        s = (s * 7).round() / 7
    extremes = draw(st.booleans())
    if extremes and n > 4:
        s[:4] = torch.tensor([0.0, 1.0, 1e-30, 1 - 2**-24])
    y = torch.randint(0, 2, (n,), generator=gen)
    y[0], y[1] = 0, 1
    return s.numpy().astype("float32"), y.numpy(), {"n": n, "seed": seed, "ties": ties, "extremes": extremes}
