"""Legacy `basic_blocks.py`: attention layers, feature aggregation, the order and feature attention stacks.

Faithful to the legacy model (legacy-tsa.md sections 4-7), quirks included. Creation order of
every submodule and parameter is the legacy one: seeded initialisation depends on it.
"""

import torch
from torch import nn

from .mixture_of_experts import MoE
from .temporal_attention import TemporalMultiheadAttention


class AttentionLayer(nn.Module):
    """Post-norm layer of the order stack: x = LN1(x + drop1(attn(x))); x = LN2(x + drop2(ff(x)))."""

    def __init__(self, d_model, dim_feedforward, num_heads, dropout=0.1, use_moe=False, num_experts=5, use_time_seq=True):
        super().__init__()
        self.use_time_seq = use_time_seq
        self.use_moe = use_moe
        if use_time_seq:
            self.multi_attn = TemporalMultiheadAttention(d_model, num_heads, dropout=dropout)
        else:
            self.multi_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout)
        self.layer_norm1 = nn.LayerNorm(d_model)
        self.layer_norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if use_moe:
            self.feedforward = MoE(dim=d_model, num_experts=num_experts, hidden_dim=dim_feedforward)
        else:
            self.feedforward = nn.Sequential(
                nn.Linear(d_model, dim_feedforward), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim_feedforward, d_model)
            )

    def forward(self, x, time=None, attn_mask=None, key_padding_mask=None):
        # x: (T, B, E)
        if self.use_time_seq:
            attn_out, _ = self.multi_attn(x, x, x, time, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        else:
            attn_out, _ = self.multi_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        x = self.layer_norm1(x + self.dropout1(attn_out))
        if self.use_moe:
            ff_out, _aux_loss = self.feedforward(x)  # legacy: load-balancing loss thrown away
        else:
            ff_out = self.feedforward(x)
        x = self.layer_norm2(x + self.dropout2(ff_out))
        return x


class AttentionLayerPreNorm(nn.Module):
    """Pre-norm layer of the feature stack (always plain nn.MultiheadAttention, never masked)."""

    def __init__(self, d_model, dim_feedforward, num_heads, dropout=0.1, use_moe=False, num_experts=5):
        super().__init__()
        self.use_moe = use_moe
        self.multi_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout)
        self.layer_norm1 = nn.LayerNorm(d_model)
        self.layer_norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if use_moe:
            self.feedforward = MoE(dim=d_model, num_experts=num_experts, hidden_dim=dim_feedforward)
        else:
            self.feedforward = nn.Sequential(
                nn.Linear(d_model, dim_feedforward), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim_feedforward, d_model)
            )

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        h = self.layer_norm1(x)
        attn_out, _ = self.multi_attn(h, h, h, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        x = x + self.dropout1(attn_out)
        h = self.layer_norm2(x)
        if self.use_moe:
            ff_out, _aux_loss = self.feedforward(h)
        else:
            ff_out = self.feedforward(h)
        x = x + self.dropout2(ff_out)
        return x


class FeatureAggregation(nn.Module):
    """Six Linear layers n -> n//2 -> ... -> n//32 -> 1 along the feature axis: (B, L, D, n) -> (B, L, D, 1)."""

    def __init__(self, n_features):
        super().__init__()
        # legacy: for n < 32 some widths are 0 and the output is the last bias alone (earlier layers get zero grads)
        self.encoder = nn.Sequential(
            nn.Linear(n_features, n_features // 2),
            nn.LeakyReLU(),
            nn.Linear(n_features // 2, n_features // 4),
            nn.LeakyReLU(),
            nn.Linear(n_features // 4, n_features // 8),
            nn.LeakyReLU(),
            nn.Linear(n_features // 8, n_features // 16),
            nn.LeakyReLU(),
            nn.Linear(n_features // 16, n_features // 32),
            nn.LeakyReLU(),
            nn.Linear(n_features // 32, 1),
        )

    def forward(self, x):
        return self.encoder(x)


class OrderAttentionLayer(nn.Module):
    """The order (history) stack: per-position feature embedding, aggregation, attention over positions."""

    def __init__(
        self,
        n_cat_features,
        n_num_features,
        n_embedding,
        seq_len,
        dim_embedding_table,
        dim_attn_feedforward,
        embedding_table,
        num_heads=1,
        dropout=0.1,
        n_layers_order=1,
        emb_tbl_use_bias=1,
        use_moe=True,
        num_experts=5,
        use_time_seq=True,
        return_seq=False,
    ):
        super().__init__()
        self.n_cat_features = n_cat_features
        self.n_num_features = n_num_features
        self.n_embedding = n_embedding
        self.seq_len = seq_len
        self.dim_embedding_table = dim_embedding_table
        self.use_time_seq = use_time_seq
        self.return_seq = return_seq
        dim_attn = 2 * dim_embedding_table

        self.dummy_order = nn.Parameter(torch.rand(1, dim_attn))  # legacy: drawn first (rand, not randn)
        self.embedding = embedding_table  # legacy: the shared table, registered again here (duplicated state_dict key)
        self.layer_norm_feature = nn.LayerNorm(dim_attn)
        self.layer_stack = nn.ModuleList(
            [
                AttentionLayer(dim_attn, dim_attn_feedforward, num_heads, dropout, use_moe, num_experts, use_time_seq)
                for _ in range(n_layers_order)
            ]
        )
        self.dropout = nn.Dropout(dropout)  # legacy: created, never applied
        self.layer_norm = nn.LayerNorm(dim_attn)
        if emb_tbl_use_bias:
            self.emb_tbl_bias = nn.Parameter(torch.randn(n_cat_features + n_num_features, dim_embedding_table))  # legacy: never used in forward
        else:
            self.emb_tbl_bias = None
        self.feature_aggregation_cat = FeatureAggregation(n_cat_features)
        self.feature_aggregation_num = FeatureAggregation(n_num_features)

    def forward(self, x_cat, x_num, time_seq, attn_mask=None, key_padding_mask=None):
        B, L = x_cat.shape[0], x_cat.shape[1]
        # categorical: codes arrive as float, cast with .int()
        x_cat = self.embedding(x_cat.int())  # (B, L, n_cat, D)
        x_cat = self.feature_aggregation_cat(x_cat.permute(0, 1, 3, 2)).squeeze(-1)  # (B, L, D)
        # numerical: feature j uses table row n_emb - n_num + 1 + j, times its value
        num_idx = torch.arange(
            self.n_embedding - self.n_num_features + 1, self.n_embedding + 1, device=x_num.device
        )
        x_num = self.embedding(num_idx)[None, None] * x_num.unsqueeze(-1)  # (B, L, n_num, D)
        x_num = self.feature_aggregation_num(x_num.permute(0, 1, 3, 2)).squeeze(-1)  # (B, L, D)

        x = torch.cat([x_cat, x_num], dim=-1)  # (B, L, E)
        x = x.transpose(0, 1)  # (L, B, E)
        x = self.layer_norm_feature(x)
        dummy = self.dummy_order.unsqueeze(0).expand(1, B, -1)  # (1, B, E)
        x = torch.cat([x, dummy], dim=0)  # (L+1, B, E): dummy token last
        x = self.layer_norm(x)

        time = torch.cat([time_seq, torch.zeros(B, 1, 1, device=time_seq.device, dtype=time_seq.dtype)], dim=1)
        time = time.transpose(0, 1)  # (L+1, B, 1)

        for layer in self.layer_stack:
            x = layer(x, time, attn_mask=attn_mask, key_padding_mask=key_padding_mask)

        if self.return_seq:
            return x.transpose(0, 1)  # (B, L+1, E)
        return x[-1]  # (B, E): the dummy token


class FeatureAttentionLayer(nn.Module):
    """The feature stack over the current transaction's features (and engineered features)."""

    def __init__(
        self,
        n_cat_features,
        n_num_features,
        n_embedding,
        n_engineered_num_features,
        dim_embedding_table,
        dim_attn_feedforward,
        embedding_table,
        embedding_table_engineered,
        num_heads=1,
        dropout=0.1,
        n_layers_feature=1,
        emb_tbl_use_bias=1,
        use_moe=True,
        num_experts=5,
    ):
        super().__init__()
        self.n_cat_features = n_cat_features
        self.n_num_features = n_num_features
        self.n_embedding = n_embedding
        self.n_engineered_num_features = n_engineered_num_features
        self.dim_embedding_table = dim_embedding_table

        self.embedding = embedding_table  # legacy: shared table registered again
        self.layer_stack_feature = nn.ModuleList(
            [
                AttentionLayerPreNorm(dim_embedding_table, dim_attn_feedforward, num_heads, dropout, use_moe, num_experts)
                for _ in range(n_layers_feature)
            ]
        )
        self.dropout = nn.Dropout(dropout)  # legacy: created, never applied
        self.layer_norm = nn.LayerNorm(2 * dim_embedding_table)  # legacy: never used
        if emb_tbl_use_bias:
            self.emb_tbl_bias = nn.Parameter(torch.randn(n_cat_features + n_num_features, dim_embedding_table))
        else:
            self.emb_tbl_bias = None
        self.embedding_engineered = embedding_table_engineered  # legacy: shared engineered table registered again
        self.layer_norm_engineered = nn.LayerNorm(dim_embedding_table)
        if n_engineered_num_features > 0 and emb_tbl_use_bias:
            self.engineered_emb_tbl_bias = nn.Parameter(torch.randn(n_engineered_num_features, dim_embedding_table))
        else:
            self.engineered_emb_tbl_bias = None

    def forward(self, x_cat, x_num, x_engineered=None):
        B = x_cat.shape[0]
        x_cat = self.embedding(x_cat[:, -1, :].int())  # (B, n_cat, D): current transaction only
        num_idx = torch.arange(
            self.n_embedding - self.n_num_features + 1, self.n_embedding + 1, device=x_num.device
        )
        x_num = self.embedding(num_idx)[None] * x_num[:, -1, :].unsqueeze(-1)  # (B, n_num, D)
        x = torch.cat([x_cat, x_num], dim=1)  # (B, n_cat + n_num, D)
        if self.emb_tbl_bias is not None:
            x = x + self.emb_tbl_bias
        if self.n_engineered_num_features > 0:
            # engineered feature j uses row j + 1 (row 0 is the summary token)
            eng_idx = torch.arange(1, self.n_engineered_num_features + 1, device=x_engineered.device)
            x_eng = self.embedding_engineered(eng_idx)[None] * x_engineered.unsqueeze(-1)  # (B, n_eng, D)
            if self.emb_tbl_bias is not None:  # legacy: guarded by emb_tbl_bias, not by engineered_emb_tbl_bias
                x_eng = x_eng + self.engineered_emb_tbl_bias
            x = torch.cat([x, x_eng], dim=1)
        summary = self.embedding_engineered(torch.zeros(B, 1, dtype=torch.long, device=x.device))  # (B, 1, D): padding row, zeros
        x = torch.cat([x, summary], dim=1)  # (B, T, D)
        x = x.transpose(0, 1)  # (T, B, D)
        x = self.layer_norm_engineered(x)
        for layer in self.layer_stack_feature:
            x = layer(x)
        return x[-1]  # (B, D): the summary token
