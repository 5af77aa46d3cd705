"""Legacy-compatible model selection (``build_trainer(legacy_selection=True)``, issue 14).

The legacy ``train.py`` loop (legacy-tsa.md §12) takes two decisions after every epoch, both on
the validation AUC **rounded to 4 decimals** with Python's ``round(auc, 4)``:

- best model: saved when ``auc > best_auc`` (strict; a tie keeps the earlier epoch);
- early stopping: the pytorchtools ``EarlyStopping(patience)`` called with ``-auc`` and delta 0:
  its counter grows only when the rounded AUC is strictly *below* the best so far; a tie resets
  the counter (and becomes the new best score). The stop flag is read at the top of the next
  epoch, so no further training happens after the epoch that raised it.

Lightning's own callbacks on ``val/auroc`` (the port's default) decide on the unrounded float32
torchmetrics AUROC; its ``ModelCheckpoint`` is strict too, but its ``EarlyStopping`` counts a tie as
"no improvement" (``wait_count += 1``), the opposite of the legacy rule. docs/divergences.md has both.

The callbacks here reproduce the legacy rules:

- :class:`LegacyValAUC` computes the monitored value exactly as the legacy loop does: sklearn's
  ``roc_auc_score(label, softmax(scores)[:, -1])`` over the whole validation set (gathered from every
  rank, the rows a distributed sampler repeats dropped), then :func:`legacy_round`; it logs it as
  ``val/auc_legacy`` (float64, so the rounded value is the legacy's float).
- :class:`LegacyBestCheckpoint`: a ``ModelCheckpoint`` on it that saves only on a strict improvement
  over the best so far, starting from ``best_auc = 0`` (the legacy's initial value, assumed).
- :class:`LegacyEarlyStopping`: an ``EarlyStopping`` on it with the legacy tie rule, checked once per
  epoch after validation (where the legacy's stop takes effect: no training after that epoch).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

__all__ = [
    "LEGACY_AUC_DECIMALS",
    "LEGACY_INITIAL_BEST_AUC",
    "LEGACY_MONITOR",
    "LegacyBestCheckpoint",
    "LegacyEarlyStopping",
    "LegacyValAUC",
    "legacy_round",
    "legacy_selection_problem",
    "legacy_validation_auc",
]

LEGACY_MONITOR = "val/auc_legacy"
LEGACY_AUC_DECIMALS = 4
LEGACY_INITIAL_BEST_AUC = 0.0  # assumed: legacy-tsa.md does not give best_auc's starting value


def legacy_round(auc: Any) -> float:
    """``round(auc, 4)`` on a Python float, as the legacy loop rounds sklearn's AUC.

    Python's ``round`` rounds the exact binary value of the float (ties to even only when the binary
    value is exactly halfway): ``round(0.12345, 4) == 0.1235`` because the float 0.12345 is
    0.123450000000000004..., ``round(0.98765, 4) == 0.9877``, ``round(0.03125, 4) == 0.0312`` (an exact tie).
    numpy's ``round`` (``np.round``, and ``round()`` on an ``np.float64``) scales by 1e4 first and gives
    0.1234 and 0.9876 there: the value is converted with ``float()`` first. sklearn >= 1.6 returns a Python
    float from ``roc_auc_score``, which is what the recorded legacy runs used.
    """
    return round(float(auc), LEGACY_AUC_DECIMALS)


def legacy_selection_problem(val_check_interval: Any = None, check_val_every_n_epoch: Any = 1,
                             n_classes: Any = None) -> str | None:
    """Why ``legacy_selection`` cannot apply to these settings (one line), or ``None``."""
    if val_check_interval not in (None, 1, 1.0) or check_val_every_n_epoch != 1:
        return ("legacy_selection: the legacy loop validates once at the end of every epoch; got "
                f"val_check_interval={val_check_interval!r}, check_val_every_n_epoch={check_val_every_n_epoch!r} "
                "(use 1.0 and 1)")
    if n_classes is not None and n_classes != 2:
        return (f"legacy_selection needs a 2-class model (the legacy AUC is roc_auc_score on softmax[:, -1]); "
                f"this model has n_classes={n_classes}")
    return None


def legacy_validation_auc(labels: Any, scores: Any) -> float:
    """The legacy validation AUC (unrounded): ``roc_auc_score(label, softmax(scores)[:, -1])``."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    if y.size == 0:
        raise ValueError("legacy_selection: the validation set is empty; the legacy AUC needs labelled rows")
    classes = np.unique(y)
    if classes.size != 2:
        raise ValueError(
            f"legacy_selection: the validation labels hold {classes.size} class(es) {classes.tolist()[:5]}; "
            "the legacy AUC (roc_auc_score on softmax[:, -1]) needs exactly two"
        )
    return float(roc_auc_score(y, s))


class LegacyValAUC(Callback):
    """Logs ``val/auc_legacy``: the legacy's rounded sklearn AUC over the whole validation set.

    Collects ``probs[:, -1]``, ``y`` (and ``row_index`` when the batch has it) from every validation
    step's outputs, gathers them from all ranks (each rank then computes the same value), drops rows a
    distributed sampler repeated, and logs ``legacy_round(roc_auc_score(y, score))`` at the end of the
    validation epoch (not during the sanity check). ``history`` keeps ``(epoch, raw, rounded)`` of each
    epoch.
    """

    def __init__(self, monitor: str = LEGACY_MONITOR) -> None:
        self.monitor = monitor
        self.history: list[tuple[int, float, float]] = []
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        problem = legacy_selection_problem(n_classes=getattr(pl_module, "hparams", {}).get("n_classes", 2))
        if problem:
            raise ValueError(problem)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buf = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        if trainer.sanity_checking or not isinstance(outputs, dict) or "probs" not in outputs:
            return
        probs = outputs["probs"].detach().float().cpu()
        score = (probs[:, -1] if probs.dim() == 2 else probs).numpy().reshape(-1)
        y = outputs.get("y")
        if y is None and isinstance(batch, dict):
            y = batch.get("y")
        if y is None:
            raise ValueError("legacy_selection: validation batches carry no labels 'y'; the legacy AUC needs them")
        idx = batch.get("row_index") if isinstance(batch, dict) else None
        self._buf.append((score, y.detach().cpu().numpy().reshape(-1),
                          None if idx is None else idx.detach().cpu().numpy().reshape(-1)))

    def _gathered(self, trainer: pl.Trainer) -> tuple[np.ndarray, np.ndarray]:
        parts = self._buf
        self._buf = []
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(every, parts)
            parts = [p for rank_parts in every for p in rank_parts]
        if not parts:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if all(p[2] is not None for p in parts):
            _, first = np.unique(np.concatenate([p[2] for p in parts]), return_index=True)
            scores, labels = scores[first], labels[first]  # file order, sampler padding dropped
        return scores, labels

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._buf = []
            return
        scores, labels = self._gathered(trainer)
        raw = legacy_validation_auc(labels, scores)
        rounded = legacy_round(raw)
        self.history.append((int(trainer.current_epoch), raw, rounded))
        # float64 and batch_size 1: Lightning's epoch mean then returns exactly this float
        pl_module.log(self.monitor, torch.tensor(rounded, dtype=torch.float64), on_step=False, on_epoch=True,
                      prog_bar=True, batch_size=1)


class LegacyBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with the legacy best-model rule: save when the monitored value is strictly
    greater than the best so far, the first best being ``LEGACY_INITIAL_BEST_AUC`` (not "anything");
    a NaN never counts as an improvement (Lightning's own would save it as -inf when nothing is saved)."""

    def __init__(self, monitor: str = LEGACY_MONITOR, **kwargs: Any) -> None:
        kwargs.setdefault("save_top_k", 1)
        if kwargs["save_top_k"] != 1:
            raise ValueError("LegacyBestCheckpoint keeps one best checkpoint (save_top_k=1), as the legacy loop")
        super().__init__(monitor=monitor, mode="max", **kwargs)

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None:
            return False
        best = float(self.best_model_score) if self.best_model_score is not None else LEGACY_INITIAL_BEST_AUC
        improved = float(current) > best  # legacy: `if auc > best_auc` (a tie keeps the earlier epoch)
        return bool(trainer.strategy.reduce_boolean_decision(improved))


class LegacyEarlyStopping(EarlyStopping):
    """``EarlyStopping`` with the legacy pytorchtools rule (called with ``-auc``, delta 0): only a value
    strictly below the best so far counts (``counter += 1``, stop at ``counter >= patience``); a tie or
    an improvement becomes the new best and resets the counter. No stop on NaN (the legacy rule has
    none: ``nan < best`` is false, so a NaN resets the counter). ``stop_epoch`` is the epoch whose
    validation raised the stop, or ``None``."""

    def __init__(self, monitor: str = LEGACY_MONITOR, patience: int = 10, **kwargs: Any) -> None:
        super().__init__(monitor=monitor, mode="max", patience=patience, min_delta=0.0, check_finite=False,
                         **kwargs)
        self.stop_epoch: int | None = None
        self._raised = False

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        value = float(current)
        best = float(self.best_score)
        if not value < best:  # legacy: `elif score < self.best_score + self.delta: counter += 1` else reset
            self.best_score = current.detach().clone().to(torch.float64)
            self.wait_count = 0
            return False, f"{self.monitor} = {value} >= best {best}: counter reset (legacy tie rule)"
        self.wait_count += 1
        if self.wait_count >= self.patience:
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            self._raised = True
            return True, (f"{self.monitor} below its best {best} for {self.wait_count} validations in a row "
                          f"(legacy patience {self.patience}): stopping")
        return False, None

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        super()._run_early_stopping_check(trainer)
        if self._raised and self.stop_epoch is None:
            self.stop_epoch = int(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stop_epoch": self.stop_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stop_epoch = state_dict.get("stop_epoch")
