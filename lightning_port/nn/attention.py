"""Attention blocks of the TSA networks: the time factor, multi-head attention, and the post-norm
(order stack) and pre-norm (feature stack) layers.

All tensors here are sequence-first, ``(T, B, width)``, as in the legacy model.

Lean last layer: every stack returns only its last token (the dummy / summary token), so its last layer
is called with ``last_only=True``: keys and values of every token, but the query, attention, residual,
norms and feed-forward / MoE of the last token alone. The MoE group of that position is the batch at that
position (legacy-tsa.md section 3), so routing and capacity are those of the full computation. Every
random draw of the full computation still happens, at its full shape and in its order, when
``legacy_rng`` (see :mod:`lightning_port.nn.draws`); nothing reads the other tokens' outputs of the last
layer, so outputs and gradients are the full computation's (up to fp32 rounding of the smaller matmuls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .draws import RandomDraws, dropout, dropout_last

# legacy: the time column is in the units of `time_to_last`; 1e6 is the legacy time scale.
TIME_SCALE = 1e6


class TimeEncode(nn.Module):
    """The legacy time factor ``alpha[b, i, j] = exp((t_i - t_j) / 1e6)``.

    ``time`` is ``(T, B, 1)``; returns ``(B, 1, T, T)`` (the same factor for every head), or
    ``(B, 1, 1, T)`` for the last query position (``last_row``).
    Overflows float32 when a time gap exceeds ~8.8e7, exactly like the legacy model.
    """

    def forward(self, time: Tensor, last_row: bool = False) -> Tensor:
        t = time[..., 0].transpose(0, 1)  # (B, T)
        ti = t[:, -1:] if last_row else t
        return torch.exp((ti[:, :, None] - t[:, None, :]) / TIME_SCALE).unsqueeze(1)  # (B, 1, T or 1, T)


class MultiheadAttention(RandomDraws, nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameters, initialisation and layout,
    optionally with the legacy temporal factor multiplied into the logits after masking.

    Written out (softmax -> dropout -> @v) rather than fused, so that training-mode dropout
    draws the same random numbers on the same ``(B·H, T, T)`` weights as the legacy model.
    ``last_only=True`` computes the last query position only (keys and values of every token).
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

    def _project(self, x: Tensor, last_only: bool) -> tuple[Tensor, Tensor, Tensor]:
        if not last_only:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # (T, B, E) each
            return q, k, v
        E = self.embed_dim
        q = F.linear(x[-1:], self.in_proj_weight[:E], self.in_proj_bias[:E])  # (1, B, E)
        k, v = F.linear(x, self.in_proj_weight[E:], self.in_proj_bias[E:]).chunk(2, dim=-1)  # (T, B, E)
        return q, k, v

    def forward(self, x: Tensor, time: Tensor | None = None, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        T, B, E = x.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = self._project(x, last_only)
        R = q.shape[0]  # query rows: T, or 1 with last_only
        if self._fast_train_fused(attn_mask) and q.dtype != torch.float16:  # fp16: exp(±gap/2s) may overflow
            return self._fused(q, k, v, time, key_padding_mask, dropout_p=self.dropout, centred=True)
        if self._can_fuse(attn_mask, time):
            return self._fused(q, k, v, time, key_padding_mask)
        q = q * float(hd) ** -0.5
        # heads as nn.MultiheadAttention: (T, B, E) -> (B·H, T, hd), row b·H + h
        q = q.reshape(R, B * H, hd).transpose(0, 1)
        k = k.reshape(T, B * H, hd).transpose(0, 1)
        v = v.reshape(T, B * H, hd).transpose(0, 1)
        logits = torch.bmm(q, k.transpose(1, 2)).view(B, H, R, T)
        if attn_mask is not None:
            mask = attn_mask[..., -1:, :] if last_only else attn_mask  # (R, T), or (B·H, R, T)
            if mask.dim() == 3:
                mask = mask.reshape(B, H, R, T)
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(mask, float("-inf"))
            else:
                logits = logits + mask
        if key_padding_mask is not None:  # (B, T), True = ignore
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if self.use_time:
            # legacy: after masking, same for all heads
            logits = self.time_encode(time, last_row=last_only) * logits
        weights = torch.softmax(logits.view(B * H, R, T), dim=-1)
        if not last_only:
            weights = dropout(weights, self.dropout, self.training, self.legacy_rng)
        else:  # legacy draws: the (B·H, T, T) mask, its last row used
            weights = dropout_last(weights, self.dropout, self.training, self.legacy_rng, (B * H, T, T), dim=1)
        out = torch.bmm(weights, v)  # (B·H, R, hd)
        out = out.transpose(0, 1).reshape(R * B, E)
        return self.out_proj(out).view(R, B, E)

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

    # CPU training on SDPA (fast path, dropout 0 only): off by default -- it rounds differently from the explicit
    # path, and the fast path's gradients are compared with the exact path's in one operation order (parity
    # fast_path.grads_vs_exact); tests switch it on to exercise the accelerators' training kernel path on CPU.
    fused_train_on_cpu = False

    def _fast_train_fused(self, attn_mask: Tensor | None) -> bool:
        """Fast path (``legacy_rng=False``) in training: ``F.scaled_dot_product_attention`` with the
        dropout inside its fused kernels on an accelerator (CPU's fused kernels have no dropout: with dropout
        SDPA falls back to its math path and ``bernoulli_``, so the explicit path with
        :func:`~lightning_port.nn.draws.fast_dropout` is faster there; see ``fused_train_on_cpu``)."""
        if not (self.training and not self.legacy_rng and attn_mask is None and not torch.jit.is_tracing()):
            return False
        return self.in_proj_weight.device.type != "cpu" or (self.fused_train_on_cpu and self.dropout == 0)

    def _fused(self, q: Tensor, k: Tensor, v: Tensor, time: Tensor | None,
               key_padding_mask: Tensor | None, dropout_p: float = 0.0, centred: bool = False) -> Tensor:
        """Attention on ``F.scaled_dot_product_attention``. The legacy time factor is separable,
        ``exp((t_i - t_j)/s) = exp((t_i - c)/s) · exp(-(t_j - c)/s)``, so ``alpha ⊙ (q·k)`` equals the plain
        product of queries scaled by ``exp((t_i - c)/s)`` and keys scaled by ``exp(-(t_j - c)/s)``; masked
        keys stay at -inf either way (alpha > 0 and finite). ``c = 0`` in the eval path (guarded by
        :meth:`_can_fuse`); ``centred``: ``c`` = the midpoint of each row's times, so both factors stay
        within ``exp(±gap/2s)`` and are finite wherever the legacy's ``exp(gap/s)`` is (no data check)."""
        T, B, E = k.shape
        R = q.shape[0]
        H, hd = self.num_heads, self.head_dim
        q = q.reshape(R, B, H, hd).permute(1, 2, 0, 3)  # (B, H, R, hd)
        k = k.reshape(T, B, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(T, B, H, hd).permute(1, 2, 0, 3)
        if self.use_time:
            t = time[..., 0].transpose(0, 1).float()  # (B, T)
            if centred:
                t = t - (t.amax(dim=1, keepdim=True) + t.amin(dim=1, keepdim=True)) / 2
            t = (t / TIME_SCALE)[:, None, :, None]  # (B, 1, T, 1)
            q = q * torch.exp(t[:, :, -R:]).to(q.dtype)
            k = k * torch.exp(-t).to(k.dtype)
        mask = None
        if key_padding_mask is not None:
            mask = torch.logical_not(key_padding_mask)[:, None, None, :]  # (B, 1, 1, T) True = keep
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, R, hd)
        out = out.permute(2, 0, 1, 3).reshape(R * B, E)
        return self.out_proj(out).view(R, B, E)


def _ff_stored_order(ff: nn.Module) -> tuple[int, ...] | None:
    """Memory order of the feed-forward's full (T, B, W) output (the legacy one-expert MoE's is (T, W, B))."""
    from .moe import MixtureOfExperts

    if isinstance(ff, MixtureOfExperts) and ff.num_experts == 1:
        return (0, 2, 1)
    return None


class _Layer(RandomDraws, nn.Module):
    """Shared by both layer kinds: the residual dropouts, full or of the last token only."""

    def _drop(self, module: nn.Dropout, y: Tensor, T: int, last_only: bool,
              stored_order: tuple[int, ...] | None = None) -> Tensor:
        if not last_only:
            return dropout(y, module.p, self.training, self.legacy_rng)
        return dropout_last(y, module.p, self.training, self.legacy_rng, (T, *y.shape[1:]), 0, stored_order)


class AttentionLayerPostNorm(_Layer):
    """Order-stack layer: ``x = LN1(x + drop(attn(x)))``; ``x = LN2(x + drop(ff(x)))``.
    ``last_only``: the last token's output (1, B, W) only (see the module docstring)."""

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
                key_padding_mask: Tensor | None = None, row_mask: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        T = x.shape[0]
        a = self.attn(x, time, attn_mask, key_padding_mask, last_only=last_only)  # (T or 1, B, W)
        if last_only:
            x = x[-1:]
        x = self.norm1(x + self._drop(self.drop1, a, T, last_only))
        f = _ff(self.ff, x, row_mask, T if last_only else None)
        return self.norm2(x + self._drop(self.drop2, f, T, last_only, _ff_stored_order(self.ff)))


class AttentionLayerPreNorm(_Layer):
    """Feature-stack layer: ``x = x + drop(attn(LN1(x)))``; ``x = x + drop(ff(LN2(x)))``.
    ``last_only``: the last token's output (1, B, W) only (see the module docstring)."""

    def __init__(self, width: int, num_heads: int, dropout: float, feedforward: Callable[[], nn.Module]):
        super().__init__()
        self.attn = MultiheadAttention(width, num_heads, dropout, use_time=False)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = feedforward()  # built after attn: legacy creation order
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, last_only: bool = False) -> Tensor:
        T = x.shape[0]
        a = self.attn(self.norm1(x), last_only=last_only)  # (T or 1, B, W)
        if last_only:
            x = x[-1:]
        x = x + self._drop(self.drop1, a, T, last_only)
        f = _ff(self.ff, self.norm2(x), None, T if last_only else None)
        return x + self._drop(self.drop2, f, T, last_only, _ff_stored_order(self.ff))


def _ff(ff: nn.Module, x: Tensor, row_mask: Tensor | None, full_T: int | None) -> Tensor:
    """The layer's feed-forward on ``x``: all positions, or (``full_T`` given) the last of full_T."""
    from .moe import MixtureOfExperts

    if isinstance(ff, MixtureOfExperts):
        return ff(x, row_mask=row_mask, full_T=full_T)
    return ff(x, full_T=full_T)
