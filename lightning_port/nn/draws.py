"""The random draws of the TSA networks (dropout masks and the MoE coin flips), in the legacy order or
from the fastest source.

``legacy_rng=True`` (the default): every draw is the legacy model's -- the global CPU generator, the
same call order, the same shapes and memory layouts -- so the same seed gives the same masks and coins.
Where the port computes only the summary token of a stack's last layer (see ``last_only`` in
:mod:`lightning_port.nn.attention`), the legacy mask is still drawn at the full shape and only its last
row is used (:func:`dropout_last`), so the generator ends where the full computation leaves it.

``legacy_rng=False`` (the opt-in fast path, training only): the same distributions drawn as cheaply as
possible and only where a value is read: on CPU in eager mode one 31-bit integer per element compared
with ``round(p·2^31)`` (about 2.5x cheaper than ``bernoulli_``'s double-precision uniform); under
``torch.compile`` and on accelerators ``F.dropout`` (inductor's in-kernel random numbers, CUDA's fused
Philox dropout). The keep rate is ``1 - round(p·2^31)/2^31``, within 2^-32 of ``1 - p``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INT31 = 2 ** 31


class RandomDraws:
    """Mixin of the modules that draw random numbers: ``legacy_rng`` is set for the whole network by
    :func:`set_legacy_rng` (a plain attribute, not a buffer: it is a hyperparameter, not a weight)."""

    legacy_rng: bool = True


def set_legacy_rng(network: nn.Module, on: bool) -> None:
    for m in network.modules():
        if isinstance(m, RandomDraws):
            m.legacy_rng = bool(on)


def _eager_cpu(x: Tensor) -> bool:
    return (x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.jit.is_scripting())


class _KeepMask(torch.autograd.Function):
    """``x * keep * scale`` saving the bool mask only (a quarter of a float mask's memory)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def fast_dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout from the cheapest source (not the legacy stream); ``0 < p < 1``."""
    if not _eager_cpu(x):
        return F.dropout(x, p, True)
    keep = torch.empty(x.shape, dtype=torch.int32).random_() >= round(p * _INT31)
    return _KeepMask.apply(x, keep, 1.0 / (1.0 - p))


def dropout(x: Tensor, p: float, training: bool, legacy_rng: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` (legacy draws) or :func:`fast_dropout`."""
    if not training or p == 0 or x.numel() == 0:  # F.dropout draws nothing in these cases either
        return x
    if legacy_rng:
        return F.dropout(x, p, True)
    return fast_dropout(x, p)


def dropout_last(x_last: Tensor, p: float, training: bool, legacy_rng: bool, full_shape: tuple[int, ...],
                 dim: int = 0, stored_order: tuple[int, ...] | None = None) -> Tensor:
    """Dropout of ``x_last``, the last index along ``dim`` of a tensor of logical shape ``full_shape``
    that is not computed.

    Legacy draws: the mask of the whole tensor is drawn as ``F.dropout`` would draw it (``bernoulli_(1-p)``
    over ``full_shape`` in memory order; ``stored_order`` = the permutation of ``full_shape`` that is
    contiguous in memory, when the full tensor would not be), then divided by ``1 - p`` and its last index
    applied -- the values ``F.dropout`` would give that part, and the generator left where it leaves it.
    Fast draws: :func:`fast_dropout` of ``x_last`` alone.
    """
    if not training or p == 0 or x_last.numel() == 0:  # (the full tensor is empty only with x_last)
        return x_last
    if not legacy_rng:
        return fast_dropout(x_last, p)
    if stored_order is None:
        noise = x_last.new_empty(full_shape)
    else:
        noise = x_last.new_empty(tuple(full_shape[i] for i in stored_order))
        noise = noise.permute(*[stored_order.index(i) for i in range(len(full_shape))])
    noise.bernoulli_(1 - p)
    keep = noise.narrow(dim, full_shape[dim] - x_last.shape[dim], x_last.shape[dim])
    return x_last * keep.div_(1 - p)


def uniform_coins(rows: int, full_rows: int, batch: int, like: Tensor, legacy_rng: bool) -> Tensor:
    """The MoE second-expert coins ``U(0, 1)`` of shape (rows, batch) for the last ``rows`` positions of a
    (full_rows, batch) draw. Legacy: the whole (full_rows, batch) tensor is drawn (one ``uniform_`` per
    MoE call, legacy-tsa.md section 3) and its last rows returned. Fast: only the rows that are read."""
    n = full_rows if legacy_rng else rows
    coin = torch.zeros((n, batch), dtype=like.dtype, device=like.device).uniform_(0.0, 1.0)
    return coin[n - rows:]
