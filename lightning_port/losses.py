"""Loss functions with the legacy semantics (legacy ``set_loss``, ``focalloss.py``,
``asl_focal_loss.py``), and a :func:`build_loss` factory.

All take ``(logits (B, C), target (B,) int64)``; the cyclical focal loss also takes ``epoch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")
FOCAL_TARGET_EPS = 1e-6  # legacy: added to every entry of the one-hot target


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    return reduction


class FocalLoss(nn.Module):
    """Legacy focal loss: ``Σ_c t_c · (−alpha · (1 − p_c)^gamma · log p_c)`` per sample, with
    ``t`` = one-hot target + 1e-6 on every entry and the same ``alpha`` for every class."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean"):
        super().__init__()
        self.gamma, self.alpha, self.reduction = gamma, alpha, _check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        p = torch.softmax(logits, dim=1)
        log_p = torch.log_softmax(logits, dim=1)  # legacy: log_softmax, finite where softmax underflows to 0
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype) + FOCAL_TARGET_EPS
        loss = (onehot * (-self.alpha * (1 - p).pow(self.gamma) * log_p)).sum(dim=1)
        return _reduce(loss, self.reduction)


def _asymmetric_terms(logits: Tensor, target: Tensor, gamma_pos: float, gamma_neg: float):
    log_p = torch.log_softmax(logits, dim=-1)
    targets = torch.zeros_like(logits).scatter_(1, target.long().unsqueeze(1), 1)
    anti = 1 - targets
    p = torch.exp(log_p)
    p_pos, p_neg = p * targets, (1 - p) * anti
    asym_w = torch.pow(1 - p_pos - p_neg, gamma_pos * targets + gamma_neg * anti)
    return log_p, targets, p_pos, asym_w


def _smoothed_loss(log_p: Tensor, targets: Tensor, eps: float, reduction: str) -> Tensor:
    if eps > 0:  # label smoothing
        targets = targets * (1 - eps) + eps / log_p.shape[-1]
    return _reduce(-(targets * log_p).sum(dim=-1), reduction)


class ASLSingleLabel(nn.Module):
    """Label-smoothed asymmetric loss for single-label classification (legacy ``ASLSingleLabel``)."""

    def __init__(self, gamma_pos: float = 0, gamma_neg: float = 4, eps: float = 0.1, reduction: str = "mean"):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.eps = gamma_pos, gamma_neg, eps
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        log_p, targets, _, asym_w = _asymmetric_terms(logits, target, self.gamma_pos, self.gamma_neg)
        return _smoothed_loss(log_p * asym_w, targets, self.eps, self.reduction)


def cyclical_eta(epoch: int, epochs: int, factor: float) -> float:
    """Legacy schedule: 1 − factor·epoch/(epochs−1) while factor·epoch < epochs; then 0 if
    factor == 1, else (factor·epoch/(epochs−1) − 1)/(factor − 1)."""
    if factor * epoch < epochs:
        return 1 - factor * epoch / (epochs - 1)
    if factor == 1.0:
        return 0.0
    return (factor * epoch / (epochs - 1) - 1.0) / (factor - 1.0)


class CyclicalFocalLoss(nn.Module):
    """Cyclical focal loss (legacy ``Cyclical_FocalLoss``): the weight moves between the
    asymmetric focal weight and the high-confidence weight ``(1 + p_target)^gamma_hc`` on the
    :func:`cyclical_eta` schedule; label smoothing ``eps``. Called as ``(logits, target, epoch)``;
    ``epoch`` defaults to ``self.epoch`` (set by the LightningModule), so it also works where the
    legacy evaluation loop crashed."""

    def __init__(self, gamma_pos: float = 0, gamma_neg: float = 4, gamma_hc: float = 0, eps: float = 0.1,
                 reduction: str = "mean", epochs: int = 200, factor: float = 2):
        super().__init__()
        if epochs < 2:
            raise ValueError(f"epochs must be >= 2 for the cyclical schedule, got {epochs}.")
        self.gamma_pos, self.gamma_neg, self.gamma_hc, self.eps = gamma_pos, gamma_neg, gamma_hc, eps
        self.reduction = _check_reduction(reduction)
        self.epochs, self.factor = epochs, factor
        self.epoch = 0

    def forward(self, logits: Tensor, target: Tensor, epoch: int | None = None) -> Tensor:
        eta = cyclical_eta(self.epoch if epoch is None else epoch, self.epochs, self.factor)
        log_p, targets, p_pos, asym_w = _asymmetric_terms(logits, target, self.gamma_pos, self.gamma_neg)
        positive_w = torch.pow(1 + p_pos, self.gamma_hc * targets)
        return _smoothed_loss(log_p * ((1 - eta) * asym_w + eta * positive_w), targets, self.eps,
                              self.reduction)


LOSSES = ("CrossEntropyLoss", "FocalLoss", "Cyclical_FocalLoss", "ASLSingleLabel")


def build_loss(name: str, *, gamma: float | None = None, alpha: float | None = None,
               reduction: str | None = None, epochs: int | None = None, **kwargs) -> nn.Module:
    """Build a loss by its legacy name (``set_loss``): ``CrossEntropyLoss`` (reduction "sum" by
    default, as legacy), ``FocalLoss``, ``Cyclical_FocalLoss`` (alias ``CyclicalFocalLoss``; epochs
    = max_epochs), ``ASLSingleLabel``. Unset arguments take the legacy defaults."""
    if name == "CrossEntropyLoss":
        return nn.CrossEntropyLoss(reduction=_check_reduction(reduction or "sum"))
    if name == "FocalLoss":
        return FocalLoss(gamma=2.0 if gamma is None else gamma, alpha=0.25 if alpha is None else alpha,
                         reduction=reduction or "mean")
    if name in ("Cyclical_FocalLoss", "CyclicalFocalLoss"):
        return CyclicalFocalLoss(gamma_neg=4 if gamma is None else gamma, reduction=reduction or "sum",
                                 epochs=epochs or 200, **kwargs)
    if name == "ASLSingleLabel":
        return ASLSingleLabel(gamma_neg=4 if gamma is None else gamma, reduction=reduction or "mean", **kwargs)
    if name == "BCEWithLogitsLoss":
        raise ValueError("BCEWithLogitsLoss cannot take (B, C) logits with integer targets (a legacy bug); "
                         "use CrossEntropyLoss.")
    raise ValueError(f"Unknown loss {name!r}; expected one of {LOSSES}.")
