"""Legacy `models.py`: the single-sequence and dual-sequence TSA classifiers (legacy-tsa.md sections 8-9)."""

import torch
from torch import nn

from .basic_blocks import FeatureAttentionLayer, OrderAttentionLayer

CLF_HIDDEN = 1024  # legacy: classifier hidden width is a literal
GATE_DIM_EMBEDDING = 16  # legacy: gate embedding width (gate stack width 32)
GATE_DIM_FEEDFORWARD = 128
GATE_HIDDEN = 256
GATE_THRESHOLD = 0.05  # legacy: card sequence computed only for rows with gate weight > 0.05
EMPTY_CARD_HISTORY_MASK_SUM = 50  # legacy: literal 50 == seq_len - 1 at the default seq_len 51


class OrderFeatureAttentionClassifier(nn.Module):
    def __init__(
        self,
        n_cat_features,
        n_num_features,
        n_classes,
        n_embedding,
        seq_len,
        n_engineered_num_features,
        dim_embedding_table,
        dim_attn_feedforward,
        use_mlp=0,
        num_heads=1,
        dropout=0.1,
        n_layers_order=1,
        n_layers_feature=1,
        emb_tbl_use_bias=1,
        use_moe=True,
        num_experts=5,
        use_time_seq=True,
        return_seq=False,
    ):
        super().__init__()
        if use_mlp:
            raise NameError("name 'MLPBlock' is not defined")  # legacy: use_mlp=1 crashes (MLPBlock undefined)
        self.n_cat_features = n_cat_features
        self.n_num_features = n_num_features
        self.n_classes = n_classes
        self.n_embedding = n_embedding
        self.seq_len = seq_len
        self.n_engineered_num_features = n_engineered_num_features
        self.dim_embedding_table = dim_embedding_table
        dim_attn = 2 * dim_embedding_table

        self.embedding = nn.Embedding(n_embedding + 2, dim_embedding_table, padding_idx=0)
        self.order_attention = OrderAttentionLayer(
            n_cat_features,
            n_num_features,
            n_embedding,
            seq_len,
            dim_embedding_table,
            dim_attn_feedforward,
            self.embedding,
            num_heads=num_heads,
            dropout=dropout,
            n_layers_order=n_layers_order,
            emb_tbl_use_bias=emb_tbl_use_bias,
            use_moe=use_moe,
            num_experts=num_experts,
            use_time_seq=use_time_seq,
            return_seq=return_seq,
        )
        self.embedding_engineered = nn.Embedding(n_engineered_num_features + 1, dim_embedding_table, padding_idx=0)
        self.feature_attention = FeatureAttentionLayer(
            n_cat_features,
            n_num_features,
            n_embedding,
            n_engineered_num_features,
            dim_embedding_table,
            dim_attn_feedforward,
            self.embedding,
            self.embedding_engineered,
            num_heads=num_heads,
            dropout=dropout,
            n_layers_feature=n_layers_feature,
            emb_tbl_use_bias=emb_tbl_use_bias,
            use_moe=use_moe,
            num_experts=num_experts,
        )
        self.layer_norm = nn.LayerNorm(dim_attn)  # legacy: never used in the single model
        self.dropout = nn.Dropout(dropout)  # legacy: created, never applied
        self.clf = nn.Sequential(
            nn.Linear(dim_attn + dim_embedding_table, CLF_HIDDEN),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(CLF_HIDDEN, n_classes),
        )

    def forward(self, x_cat, x_num, x_engineered, time_seq, attn_mask=None, key_padding_mask=None):
        x_order = self.order_attention(x_cat, x_num, time_seq, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        x_feature = self.feature_attention(x_cat, x_num, x_engineered)
        ensemble = torch.cat([x_order, x_feature], dim=-1)  # (B, E + D)
        scores = self.clf(ensemble)
        return scores, ensemble


class TwoSeqMoEOrderFeatureAttentionClassifier(nn.Module):
    def __init__(
        self,
        n_cat_features,
        n_num_features,
        n_classes,
        n_embedding,
        seq_len,
        n_engineered_num_features,
        dim_embedding_table,
        dim_attn_feedforward,
        num_heads=1,
        dropout=0.1,
        n_layers_order=1,
        n_layers_feature=1,
        emb_tbl_use_bias=1,
        use_moe=True,
        num_experts=5,
        use_time_seq=True,
        return_seq=False,
    ):
        super().__init__()
        self.n_cat_features = n_cat_features
        self.n_num_features = n_num_features
        self.n_classes = n_classes
        self.n_embedding = n_embedding
        self.seq_len = seq_len
        self.n_engineered_num_features = n_engineered_num_features
        self.dim_embedding_table = dim_embedding_table
        dim_attn = 2 * dim_embedding_table
        order_kwargs = dict(
            num_heads=num_heads,
            dropout=dropout,
            n_layers_order=n_layers_order,
            emb_tbl_use_bias=emb_tbl_use_bias,
            use_moe=use_moe,
            num_experts=num_experts,
            use_time_seq=use_time_seq,
            return_seq=return_seq,
        )

        self.embedding = nn.Embedding(n_embedding + 2, dim_embedding_table, padding_idx=0)
        self.order_attention_cid = OrderAttentionLayer(
            n_cat_features, n_num_features, n_embedding, seq_len, dim_embedding_table, dim_attn_feedforward,
            self.embedding, **order_kwargs,
        )
        self.order_attention_ccid = OrderAttentionLayer(
            n_cat_features, n_num_features, n_embedding, seq_len, dim_embedding_table, dim_attn_feedforward,
            self.embedding, **order_kwargs,
        )
        self.embedding_gate = nn.Embedding(n_embedding + 2, GATE_DIM_EMBEDDING, padding_idx=0)
        self.gate_emb = OrderAttentionLayer(
            n_cat_features,
            n_num_features,
            n_embedding,
            seq_len,
            GATE_DIM_EMBEDDING,
            GATE_DIM_FEEDFORWARD,
            self.embedding_gate,
            num_heads=1,
            dropout=dropout,
            n_layers_order=1,
            emb_tbl_use_bias=emb_tbl_use_bias,
            use_moe=False,
            num_experts=1,
            use_time_seq=False,
        )
        self.gate_score = nn.Sequential(
            nn.Linear(4 * GATE_DIM_EMBEDDING, GATE_HIDDEN),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(GATE_HIDDEN, 2),
            nn.Softmax(dim=1),
        )
        self.embedding_engineered = nn.Embedding(n_engineered_num_features + 1, dim_embedding_table, padding_idx=0)
        self.feature_attention = FeatureAttentionLayer(
            n_cat_features,
            n_num_features,
            n_embedding,
            n_engineered_num_features,
            dim_embedding_table,
            dim_attn_feedforward,
            self.embedding,
            self.embedding_engineered,
            num_heads=num_heads,
            dropout=dropout,
            n_layers_feature=n_layers_feature,
            emb_tbl_use_bias=emb_tbl_use_bias,
            use_moe=use_moe,
            num_experts=num_experts,
        )
        self.layer_norm = nn.LayerNorm(dim_attn)  # used here (unlike the single model)
        self.dropout = nn.Dropout(dropout)  # legacy: created, never applied
        self.clf = nn.Sequential(
            nn.Linear(dim_attn + dim_embedding_table, CLF_HIDDEN),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(CLF_HIDDEN, n_classes),
        )

    def forward(
        self,
        x_seq_cat_cid,
        x_seq_num_cid,
        time_seq_cid,
        x_seq_cat_ccid,
        x_seq_num_ccid,
        time_seq_ccid,
        x_engineered,
        attn_mask=None,
        key_padding_mask_cid=None,
        key_padding_mask_ccid=None,
    ):
        # one gate stack serves both sequences, cid first
        gate_cid = self.gate_emb(x_seq_cat_cid, x_seq_num_cid, time_seq_cid, attn_mask, key_padding_mask_cid)
        gate_ccid = self.gate_emb(x_seq_cat_ccid, x_seq_num_ccid, time_seq_ccid, attn_mask, key_padding_mask_ccid)
        gate_scores = self.gate_score(torch.cat([gate_cid, gate_ccid], dim=1))  # (B, 2)

        gate_scores_ccid = gate_scores.clone()
        # legacy: literal 50 (seq_len - 1 at seq_len 51): card history holds only the current order; crashes on None mask
        empty_card = key_padding_mask_ccid.sum(dim=1) == EMPTY_CARD_HISTORY_MASK_SUM
        gate_scores_ccid[empty_card, 1] = 0
        kept = gate_scores_ccid[:, 1] > GATE_THRESHOLD

        x_cid = self.order_attention_cid(
            x_seq_cat_cid, x_seq_num_cid, time_seq_cid, attn_mask=attn_mask, key_padding_mask=key_padding_mask_cid
        )
        x_ccid = torch.zeros_like(x_cid)
        if kept.any():
            # legacy: only kept rows run through the card stack, so its MoE group is the kept subset
            x_ccid[kept] = self.order_attention_ccid(
                x_seq_cat_ccid[kept],
                x_seq_num_ccid[kept],
                time_seq_ccid[kept],
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask_ccid[kept],
            )

        x_feature = self.feature_attention(x_seq_cat_cid, x_seq_num_cid, x_engineered)
        x = gate_scores[:, 0:1] * x_cid + gate_scores[:, 1:2] * x_ccid
        x = self.layer_norm(x)
        ensemble = torch.cat([x, x_feature], dim=-1)  # (B, E + D)
        scores = self.clf(ensemble)
        return scores, ensemble


LEGACY_CLASSES = {
    "single": OrderFeatureAttentionClassifier,
    "dual": TwoSeqMoEOrderFeatureAttentionClassifier,
    "OrderFeature": OrderFeatureAttentionClassifier,  # legacy `--modelname` values
    "TwoSeqMoEOrderFeature": TwoSeqMoEOrderFeatureAttentionClassifier,
}


def build_model(kind, seed=None, **kwargs):
    """The legacy model for `kind` ('single'/'dual' or a legacy modelname), seeded like the legacy trainer if `seed`."""
    cls = LEGACY_CLASSES[kind]
    if cls is TwoSeqMoEOrderFeatureAttentionClassifier:
        kwargs.pop("use_mlp", None)  # the dual constructor has no use_mlp
    if seed is not None:
        torch.manual_seed(seed)
    return cls(**kwargs)
