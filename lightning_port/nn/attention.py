"""Attention blocks of the TSA networks: the time factor, multi-head attention, and the post-norm
(order stack) and pre-norm (feature stack) layers.

All tensors here are sequence-first, ``(T, B, width)``, as in the legacy model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# legacy: the time column is in the units of `time_to_last`; 1e6 is the legacy time scale.
TIME_SCALE = 1e6


class TimeEncode(nn.Module):
    """The legacy time factor ``alpha[b, i, j] = exp((t_i - t_j) / 1e6)``.

    ``time`` is ``(T, B, 1)``; returns ``(B, 1, T, T)`` (the same factor for every head).
    Overflows float32 when a time gap exceeds ~8.8e7, exactly like the legacy model.
    """

    def forward(self, time: Tensor) -> Tensor:
        t = time[..., 0].transpose(0, 1)  # (B, T)
        return torch.exp((t[:, :, None] - t[:, None, :]) / TIME_SCALE).unsqueeze(1)  # (B, 1, T, T)


class MultiheadAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameters, initialisation and layout,
    optionally with the legacy temporal factor multiplied into the logits after masking.

    Written out (softmax -> dropout -> @v) rather than fused, so that training-mode dropout
    draws the same random numbers on the same ``(B·H, T, T)`` weights as the legacy model.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, use_time: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}.")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.use_time = use_time
        self.time_encode = TimeEncode() if use_time else None
        # Initialisation order as nn.MultiheadAttention: out_proj's default init is drawn at
        # construction, then xavier on in_proj_weight, then the biases are zeroed.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, time: Tensor | None = None, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        T, B, E = x.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # (T, B, E) each
        if self._can_fuse(attn_mask, time):
            return self._fused(q, k, v, time, key_padding_mask)
        q = q * float(hd) ** -0.5
        # heads as nn.MultiheadAttention: (T, B, E) -> (B·H, T, hd), row b·H + h
        q = q.reshape(T, B * H, hd).transpose(0, 1)
        k = k.reshape(T, B * H, hd).transpose(0, 1)
        v = v.reshape(T, B * H, hd).transpose(0, 1)
        logits = torch.bmm(q, k.transpose(1, 2)).view(B, H, T, T)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask
        if key_padding_mask is not None:  # (B, T), True = ignore
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if self.use_time:
            logits = self.time_encode(time) * logits  # legacy: after masking, same for all heads
        weights = torch.softmax(logits.view(B * H, T, T), dim=-1)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        out = torch.bmm(weights, v)  # (B·H, T, hd)
        out = out.transpose(0, 1).reshape(T * B, E)
        return self.out_proj(out).view(T, B, E)


    # exp(t_i/s) and exp(-t_j/s) stay finite and normal in float32 well below |t/s| = 80
    _FUSE_MAX_SCALED_TIME = 80.0

    fused_eval = False  # set from TSAConfig.fused_eval_attention by the networks

    def _can_fuse(self, attn_mask: Tensor | None, time: Tensor | None) -> bool:
        """Opted in, eval (no dropout draws) and no explicit attn_mask: the fused kernel computes the
        same function. Not while tracing/compiling (the time check below reads a value)."""
        if not self.fused_eval or (self.training and self.dropout > 0) or attn_mask is not None:
            return False
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        if self.use_time:
            if time is None:
                return False
            return bool(time.abs().max() < self._FUSE_MAX_SCALED_TIME * TIME_SCALE)
        return True

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, time: Tensor | None,
               key_padding_mask: Tensor | None) -> Tensor:
        """Eval path on ``F.scaled_dot_product_attention``. The legacy time factor is separable,
        ``exp((t_i - t_j)/s) = exp(t_i/s) · exp(-t_j/s)``, so ``alpha ⊙ (q·k)`` equals the plain
        product of queries scaled by ``exp(t_i/s)`` and keys scaled by ``exp(-t_j/s)``; masked keys
        stay at -inf either way (alpha > 0 and finite, guarded by :meth:`_can_fuse`)."""
        T, B, E = q.shape
        H, hd = self.num_heads, self.head_dim
        q = q.reshape(T, B, H, hd).permute(1, 2, 0, 3)  # (B, H, T, hd)
        k = k.reshape(T, B, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(T, B, H, hd).permute(1, 2, 0, 3)
        if self.use_time:
            t = (time[..., 0].transpose(0, 1) / TIME_SCALE)[:, None, :, None]  # (B, 1, T, 1)
            q = q * torch.exp(t)
            k = k * torch.exp(-t)
        mask = None
        if key_padding_mask is not None:
            mask = torch.logical_not(key_padding_mask)[:, None, None, :]  # (B, 1, 1, T) True = keep
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        out = out.permute(2, 0, 1, 3).reshape(T * B, E)
        return self.out_proj(out).view(T, B, E)


class AttentionLayerPostNorm(nn.Module):
    """Order-stack layer: ``x = LN1(x + drop(attn(x)))``; ``x = LN2(x + drop(ff(x)))``."""

    def __init__(self, width: int, num_heads: int, dropout: float,
                 feedforward: Callable[[], nn.Module], use_time: bool):
        super().__init__()
        self.attn = MultiheadAttention(width, num_heads, dropout, use_time=use_time)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = feedforward()  # built after attn: legacy creation order
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, time: Tensor | None = None, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None, row_mask: Tensor | None = None) -> Tensor:
        x = self.norm1(x + self.drop1(self.attn(x, time, attn_mask, key_padding_mask)))  # (T, B, W)
        return self.norm2(x + self.drop2(_ff(self.ff, x, row_mask)))


class AttentionLayerPreNorm(nn.Module):
    """Feature-stack layer: ``x = x + drop(attn(LN1(x)))``; ``x = x + drop(ff(LN2(x)))``."""

    def __init__(self, width: int, num_heads: int, dropout: float, feedforward: Callable[[], nn.Module]):
        super().__init__()
        self.attn = MultiheadAttention(width, num_heads, dropout, use_time=False)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = feedforward()  # built after attn: legacy creation order
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop1(self.attn(self.norm1(x)))  # (T, B, W)
        return x + self.drop2(self.ff(self.norm2(x)))


def _ff(ff: nn.Module, x: Tensor, row_mask: Tensor | None) -> Tensor:
    from .moe import MixtureOfExperts

    if isinstance(ff, MixtureOfExperts):
        return ff(x, row_mask=row_mask)
    return ff(x)
