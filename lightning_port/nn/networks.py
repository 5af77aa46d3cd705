"""The single-sequence and dual-sequence (customer + card) TSA classifier networks.

Parameter names differ from the legacy ones; :mod:`lightning_port.weight_map` is the table
between the two. Construction draws random numbers in the legacy creation order, so
``torch.manual_seed(s); Network(config)`` gives the legacy model's initial weights for seed ``s``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import TSAConfig
from .blocks import ClassifierHead
from .draws import set_legacy_rng
from .stacks import FeatureAttentionModule, OrderAttentionModule

CLF_HIDDEN = 1024
GATE_EMBEDDING_DIM = 16  # legacy gate: embedding width 16 -> order stack width 32
GATE_FEEDFORWARD = 128
GATE_HIDDEN = 256
# legacy: a card history counts as empty when its key padding mask sums to exactly 50
# (== seq_len - 1 at the default seq_len 51: only the current order is unmasked).
EMPTY_CARD_MASK_SUM = 50
GATE_KEEP_THRESHOLD = 0.05  # legacy: the card stack runs on rows with gate weight > 0.05


def _order_stack(cfg: TSAConfig) -> OrderAttentionModule:
    return OrderAttentionModule(
        cfg.n_cat_features, cfg.n_num_features, cfg.dim_embedding_table, cfg.dim_attn_feedforward,
        cfg.num_heads, cfg.dropout, cfg.n_layers_order, cfg.use_moe, cfg.num_experts, cfg.use_time_seq,
        bool(cfg.emb_tbl_use_bias), cfg.moe_eval_policy, cfg.batch_invariant,
        activation_checkpointing=cfg.activation_checkpointing)


def _feature_stack(cfg: TSAConfig) -> FeatureAttentionModule:
    return FeatureAttentionModule(
        cfg.n_cat_features, cfg.n_num_features, cfg.n_engineered_num_features, cfg.dim_embedding_table,
        cfg.dim_attn_feedforward, cfg.num_heads, cfg.dropout, cfg.n_layers_feature, cfg.use_moe,
        cfg.num_experts, bool(cfg.emb_tbl_use_bias), cfg.moe_eval_policy, cfg.batch_invariant,
        activation_checkpointing=cfg.activation_checkpointing)


def _set_fused_eval_attention(network: nn.Module, on: bool) -> None:
    from .attention import MultiheadAttention

    for m in network.modules():
        if isinstance(m, MultiheadAttention):
            m.fused_eval = bool(on)


def _embedding(rows: int, dim: int) -> nn.Embedding:
    return nn.Embedding(rows, dim, padding_idx=0)


class SingleSequenceNetwork(nn.Module):
    """Single-sequence TSA classifier (legacy ``OrderFeatureAttentionClassifier``).

    ``ensemble = [order(history) (B, E), features(current transaction) (B, D)]``;
    ``scores = head(ensemble)`` (B, n_classes).
    """

    def __init__(self, config: TSAConfig):
        super().__init__()
        cfg = self.config = config
        D, E = cfg.dim_embedding_table, cfg.dim_order
        self.embedding = _embedding(cfg.n_embedding + 2, D)
        self.order = _order_stack(cfg)
        self.embedding_engineered = _embedding(cfg.n_engineered_num_features + 1, D)
        self.features = _feature_stack(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = ClassifierHead(E + D, CLF_HIDDEN, cfg.n_classes, cfg.dropout)
        _set_fused_eval_attention(self, cfg.fused_eval_attention)
        set_legacy_rng(self, cfg.legacy_rng)

    def forward(self, x_cat: Tensor, x_num: Tensor, x_engineered: Tensor | None, time_seq: Tensor,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        table = self.embedding.weight
        x_order = self.order(table, x_cat, x_num, time_seq, attn_mask, key_padding_mask)  # (B, E)
        x_feat = self.features(table, self.embedding_engineered.weight, x_cat, x_num, x_engineered)  # (B, D)
        ensemble = torch.cat([x_order, x_feat], dim=1)  # (B, E + D)
        return self.head(ensemble), ensemble


class DualSequenceNetwork(nn.Module):
    """Customer + card sequence TSA classifier (legacy ``TwoSeqMoEOrderFeatureAttentionClassifier``).

    A small gate network (its own 16-wide table, one no-MoE, no-time order stack shared by both
    sequences, an MLP and a softmax) weighs the customer (cid) and card (ccid) order encodings.
    The card weight is zeroed on rows whose card history is empty (see ``EMPTY_CARD_MASK_SUM``),
    and the card stack runs only on rows whose card weight exceeds 0.05.

    ``card_rows``: ``"subset"`` (default) runs the card stack on the kept rows only, exactly as the
    legacy model (same random draws); ``"masked"`` runs it on every row with the kept rows as the
    MoE group -- the same function with static shapes (for export), but different coin-flip draws.
    """

    def __init__(self, config: TSAConfig, card_rows: str = "subset"):
        super().__init__()
        if card_rows not in ("subset", "masked"):
            raise ValueError(f"card_rows must be 'subset' or 'masked', got {card_rows!r}.")
        cfg = self.config = config
        self.card_rows = card_rows
        D, E = cfg.dim_embedding_table, cfg.dim_order
        self.embedding = _embedding(cfg.n_embedding + 2, D)
        self.order_cid = _order_stack(cfg)
        self.order_ccid = _order_stack(cfg)
        self.gate_embedding = _embedding(cfg.n_embedding + 2, GATE_EMBEDDING_DIM)
        self.gate_order = OrderAttentionModule(
            cfg.n_cat_features, cfg.n_num_features, GATE_EMBEDDING_DIM, GATE_FEEDFORWARD, 1, cfg.dropout,
            1, use_moe=False, num_experts=1, use_time=False, emb_tbl_use_bias=bool(cfg.emb_tbl_use_bias),
            activation_checkpointing=cfg.activation_checkpointing)
        self.gate_head = ClassifierHead(4 * GATE_EMBEDDING_DIM, GATE_HIDDEN, 2, cfg.dropout)
        self.embedding_engineered = _embedding(cfg.n_engineered_num_features + 1, D)
        self.features = _feature_stack(cfg)
        self.ensemble_norm = nn.LayerNorm(E)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = ClassifierHead(E + D, CLF_HIDDEN, cfg.n_classes, cfg.dropout)
        _set_fused_eval_attention(self, cfg.fused_eval_attention)
        set_legacy_rng(self, cfg.legacy_rng)

    def gate(self, x_seq_cat_cid, x_seq_num_cid, x_seq_cat_ccid, x_seq_num_ccid, attn_mask=None,
             key_padding_mask_cid=None, key_padding_mask_ccid=None) -> Tensor:
        """Sequence weights (B, 2) = softmax(gate_head([gate(cid), gate(ccid)])), card weight
        zeroed on rows with an empty card history."""
        table = self.gate_embedding.weight
        g_cid = self.gate_order(table, x_seq_cat_cid, x_seq_num_cid, None, attn_mask, key_padding_mask_cid)
        g_ccid = self.gate_order(table, x_seq_cat_ccid, x_seq_num_ccid, None, attn_mask, key_padding_mask_ccid)
        g = torch.softmax(self.gate_head(torch.cat([g_cid, g_ccid], dim=1)), dim=1)  # (B, 2)
        empty_card = key_padding_mask_ccid.sum(dim=1) == EMPTY_CARD_MASK_SUM  # (B,)
        return torch.stack([g[:, 0], g[:, 1].masked_fill(empty_card, 0.0)], dim=1)

    def forward(self, x_seq_cat_cid: Tensor, x_seq_num_cid: Tensor, time_seq_cid: Tensor,
                x_seq_cat_ccid: Tensor, x_seq_num_ccid: Tensor, time_seq_ccid: Tensor,
                x_engineered: Tensor | None, attn_mask: Tensor | None = None,
                key_padding_mask_cid: Tensor | None = None, key_padding_mask_ccid: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        if key_padding_mask_ccid is None:
            raise ValueError("key_padding_mask_ccid is required: the card gate reads it.")
        g = self.gate(x_seq_cat_cid, x_seq_num_cid, x_seq_cat_ccid, x_seq_num_ccid, attn_mask,
                      key_padding_mask_cid, key_padding_mask_ccid)  # (B, 2)
        self.last_gate = g.detach()
        kept = g[:, 1] > GATE_KEEP_THRESHOLD  # (B,)
        table = self.embedding.weight
        x_cid = self.order_cid(table, x_seq_cat_cid, x_seq_num_cid, time_seq_cid, attn_mask,
                               key_padding_mask_cid)  # (B, E)
        if self.card_rows == "masked":
            x_ccid = self.order_ccid(table, x_seq_cat_ccid, x_seq_num_ccid, time_seq_ccid, attn_mask,
                                     key_padding_mask_ccid, row_mask=kept)
            x_ccid = x_ccid * kept[:, None]
        else:
            x_ccid = torch.zeros_like(x_cid)
            if bool(kept.any()):
                idx = kept.nonzero()[:, 0]
                kpm = None if key_padding_mask_ccid is None else key_padding_mask_ccid[idx]
                sub = self.order_ccid(table, x_seq_cat_ccid[idx], x_seq_num_ccid[idx], time_seq_ccid[idx],
                                      attn_mask, kpm)
                x_ccid = x_ccid.index_put((idx,), sub)
        x_feat = self.features(table, self.embedding_engineered.weight, x_seq_cat_cid, x_seq_num_cid,
                               x_engineered)  # (B, D)
        mixed = self.ensemble_norm(g[:, :1] * x_cid + g[:, 1:] * x_ccid)  # (B, E)
        ensemble = torch.cat([mixed, x_feat], dim=1)  # (B, E + D)
        return self.head(ensemble), ensemble
