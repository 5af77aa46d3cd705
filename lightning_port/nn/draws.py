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


# --- the legacy draws inside torch.compile ------------------------------------------------------------------
# Inductor's fallback_random calls the eager random kernels, but it may schedule two independent random ops
# (say, a dropout of the order stack and one of the feature stack) in another order than the program's, which
# changes which numbers each gets. The legacy draws are therefore custom ops registered as *ordered effects*:
# AOTAutograd threads an effect token through them, so the compiled graph makes them in program order, each
# calling the eager kernel on the global generator. Eager code does not go through them.
@torch.library.custom_op("tsa::legacy_bernoulli", mutates_args=())
def _legacy_bernoulli_op(like: Tensor, shape: list[int], p: float) -> Tensor:
    return like.new_empty(shape).bernoulli_(p)


@_legacy_bernoulli_op.register_fake
def _(like, shape, p):
    return like.new_empty(shape)


@torch.library.custom_op("tsa::legacy_uniform", mutates_args=())
def _legacy_uniform_op(like: Tensor, shape: list[int]) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device).uniform_(0.0, 1.0)


@_legacy_uniform_op.register_fake
def _(like, shape):
    return like.new_empty(shape)


def _register_ordered_effects() -> bool:
    try:
        from torch._higher_order_ops.effects import _EffectType, _register_effectful_op
    except ImportError:  # pragma: no cover - other torch versions: graph breaks instead (see _compiling_draw)
        return False
    for op in (torch.ops.tsa.legacy_bernoulli.default, torch.ops.tsa.legacy_uniform.default):
        _register_effectful_op(op, _EffectType.ORDERED)
    return True


_ORDERED_EFFECTS = _register_ordered_effects()


@torch.compiler.disable
def _eager_bernoulli(like: Tensor, shape: list[int], p: float) -> Tensor:
    return like.new_empty(shape).bernoulli_(p)


@torch.compiler.disable
def _eager_uniform(like: Tensor, shape: list[int]) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device).uniform_(0.0, 1.0)


def _bernoulli(like: Tensor, shape, p: float) -> Tensor:
    """``like.new_empty(shape).bernoulli_(p)``: the legacy draw, also in program order when compiled."""
    if not torch.compiler.is_compiling():
        return like.new_empty(shape).bernoulli_(p)
    if _ORDERED_EFFECTS:
        return torch.ops.tsa.legacy_bernoulli(like.detach(), list(shape), p)
    return _eager_bernoulli(like.detach(), list(shape), p)


def _uniform(like: Tensor, shape) -> Tensor:
    """``torch.zeros(shape).uniform_(0, 1)``: the legacy coin draw, also in program order when compiled."""
    if not torch.compiler.is_compiling():
        return torch.zeros(shape, dtype=like.dtype, device=like.device).uniform_(0.0, 1.0)
    if _ORDERED_EFFECTS:
        return torch.ops.tsa.legacy_uniform(like.detach(), list(shape))
    return _eager_uniform(like.detach(), list(shape))


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
        if torch.compiler.is_compiling():  # F.dropout's own draw, in program order (see _bernoulli)
            return x * _bernoulli(x, x.shape, 1 - p).div_(1 - p)
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
        noise = _bernoulli(x_last, full_shape, 1 - p)
    else:  # drawn in memory order
        noise = _bernoulli(x_last, tuple(full_shape[i] for i in stored_order), 1 - p)
        noise = noise.permute(*[stored_order.index(i) for i in range(len(full_shape))])
    keep = noise.narrow(dim, full_shape[dim] - x_last.shape[dim], x_last.shape[dim])
    return x_last * keep.div_(1 - p)


def uniform_coins(rows: int, full_rows: int, batch: int, like: Tensor, legacy_rng: bool) -> Tensor:
    """The MoE second-expert coins ``U(0, 1)`` of shape (rows, batch) for the last ``rows`` positions of a
    (full_rows, batch) draw. Legacy: the whole (full_rows, batch) tensor is drawn (one ``uniform_`` per
    MoE call, legacy-tsa.md section 3) and its last rows returned. Fast: only the rows that are read."""
    if not legacy_rng:
        return torch.rand((rows, batch), dtype=like.dtype, device=like.device)
    return _uniform(like, (full_rows, batch))[full_rows - rows:]
