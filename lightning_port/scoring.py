"""Evaluation plots and the ``ScoreWriter`` callback, which writes the legacy score files.

The byte formats of ``score_file.csv``, ``tag_file.csv`` and ``percentile_score.pkl`` and their readers
and writers are :mod:`lightning_port.legacy_files` (re-exported here: ``write_score_file``,
``write_tag_file``, ``percentile_table``, ``write_percentile_table``, ``read_score_file``,
``PERCENTILE_ROWS``).

``ScoreWriter`` collects ``probs`` (and ``y``) from ``test_step`` outputs (the validation set →
``score_file.csv``, ``tag_file.csv``, ``roc_pr_curves.png``, ``score_distribution.png``, and the
ROC/PR figure in TensorBoard) and from ``predict_step`` outputs (the calibration set →
``cali_score_file.csv``, ``cali_tag_file.csv`` when labels are present, ``percentile_score.pkl``,
``cali_score_distribution.png``). Rows are written in file order, also under DDP (batches carry
``row_index``; duplicates added by distributed samplers are dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .legacy_files import (
    PERCENTILE_ROWS,
    percentile_table,
    read_score_file,
    write_percentile_table,
    write_score_file,
    write_tag_file,
)

__all__ = [
    "PERCENTILE_ROWS",
    "ScoreWriter",
    "percentile_table",
    "read_score_file",
    "run_dir",
    "positive_scores",
    "roc_pr_figure",
    "save_figure",
    "score_distribution_figure",
    "write_percentile_table",
    "write_score_file",
    "write_tag_file",
]


def positive_scores(probs: Any) -> np.ndarray:
    """``softmax[:, -1]`` as float32 (the legacy score: probability of the last class)."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim == 2:
        p = p[:, -1]
    return np.asarray(p, dtype=np.float32).reshape(-1)


# ---- plots ------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # Agg canvas without pyplot's global state
    return fig


def roc_pr_figure(scores: Any, labels: Any, title: str = "validation") -> Figure:
    """ROC and precision-recall curves of binary scores (AUROC and average precision in the legends)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    y = (y == y.max()).astype(np.int64) if y.size else y  # last class = positive, like the score
    fig = _figure(11, 4.5)
    ax_roc, ax_pr = fig.subplots(1, 2)
    both = y.size and 0 < y.sum() < y.size
    if both:
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        ax_roc.plot(fpr, tpr, lw=2, label=f"AUROC = {roc_auc_score(y, s):.4f}")
        ax_pr.plot(rec, prec, lw=2, label=f"AP = {average_precision_score(y, s):.4f}")
        ax_pr.axhline(y.mean(), color="k", ls="--", lw=1, label=f"prevalence = {y.mean():.3f}")
    else:
        ax_roc.text(0.5, 0.5, "one class only: no curve", ha="center")
    ax_roc.plot([0, 1], [0, 1], "k--", lw=1)
    ax_roc.set(xlabel="False positive rate", ylabel="True positive rate", title=f"ROC ({title}, n={y.size})")
    ax_pr.set(xlabel="Recall", ylabel="Precision", title=f"Precision-recall ({title})", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(True, alpha=0.3)
        if both:
            ax.legend(loc="lower right" if ax is ax_roc else "lower left")
    fig.tight_layout()
    return fig


def score_distribution_figure(scores: Any, labels: Any | None = None, title: str = "validation") -> Figure:
    """Histogram of the scores, split by label when labels are given."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 51)
    if labels is None:
        ax.hist(s, bins=bins, alpha=0.8, label=f"all (n={s.size})")
    else:
        y = np.asarray(labels).reshape(-1)
        for value in np.unique(y):
            sel = s[y == value]
            ax.hist(sel, bins=bins, alpha=0.6, density=True, label=f"label {int(value)} (n={sel.size})")
    ax.set(xlabel="score (softmax of the last class)", ylabel="density" if labels is not None else "count",
           title=f"Score distribution ({title})")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


# ---- callback ------------------------------------------------------------------------------------------
def run_dir(trainer: pl.Trainer) -> str:
    """The run's log directory without a collective (``trainer.log_dir`` broadcasts under DDP,
    which deadlocks when only rank 0 asks)."""
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return str(log_dir or trainer.default_root_dir)


def _tensorboard(trainer: pl.Trainer) -> Any | None:
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_figure"):
            return exp
    return None


class ScoreWriter(pl.Callback):
    """Writes the legacy score files, the percentile table and the plots under the run's log dir.

    Args:
        out_dir: where to write; default ``trainer.log_dir`` (the TensorBoard version directory).
        plots: also write the PNGs (and log the ROC/PR figure to TensorBoard on test).
    """

    def __init__(self, out_dir: str | None = None, plots: bool = True) -> None:
        self.out_dir = out_dir
        self.plots = plots
        self._buf: dict[str, list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]] = {"test": [], "predict": []}
        self.written: dict[str, Path] = {}

    # -- collection
    def _collect(self, stage: str, outputs: Any, batch: Any) -> None:
        if not isinstance(outputs, dict) or "probs" not in outputs:
            return
        probs = outputs["probs"].detach().float().cpu().numpy()
        y = outputs.get("y")
        if y is None and isinstance(batch, dict):
            y = batch.get("y")
        y = None if y is None else y.detach().cpu().numpy().reshape(-1)
        idx = batch.get("row_index") if isinstance(batch, dict) else None
        idx = None if idx is None else idx.detach().cpu().numpy().reshape(-1)
        self._buf[stage].append((probs, y, idx))

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buf["test"] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buf["predict"] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._collect("test", outputs, batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._collect("predict", outputs, batch)

    def _gather(self, trainer: pl.Trainer, stage: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """All ranks' rows, deduplicated and in file order (rank 0 gets them; others get None)."""
        local = self._buf[stage]
        self._buf[stage] = []
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, local)
            parts = [p for rank_parts in gathered for p in rank_parts]
        else:
            parts = local
        if not trainer.is_global_zero or not parts:
            return None
        probs = np.concatenate([p[0] for p in parts])
        ys = [p[1] for p in parts]
        y = np.concatenate(ys) if all(v is not None for v in ys) else None
        idxs = [p[2] for p in parts]
        if all(v is not None for v in idxs):
            idx = np.concatenate(idxs)
            uniq, first = np.unique(idx, return_index=True)  # sorted by row, duplicates dropped
            probs = probs[first]
            y = None if y is None else y[first]
        return probs, y

    def _dir(self, trainer: pl.Trainer) -> Path:
        d = Path(self.out_dir or run_dir(trainer))
        d.mkdir(parents=True, exist_ok=True)
        return d

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        got = self._gather(trainer, "test")
        if got is None:
            return
        probs, y = got
        scores = positive_scores(probs)
        d = self._dir(trainer)
        self.written["score_file"] = write_score_file(d / "score_file.csv", scores)
        if y is not None:
            self.written["tag_file"] = write_tag_file(d / "tag_file.csv", y)
        if self.plots and y is not None:
            fig = roc_pr_figure(scores, y, title="validation")
            self.written["roc_pr"] = save_figure(fig, d / "roc_pr_curves.png")
            tb = _tensorboard(trainer)
            if tb is not None:
                tb.add_figure("test/roc_pr_curves", fig, global_step=trainer.global_step)
            dist = score_distribution_figure(scores, y, title="validation")
            self.written["score_distribution"] = save_figure(dist, d / "score_distribution.png")
            if tb is not None:
                tb.add_figure("test/score_distribution", dist, global_step=trainer.global_step)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        got = self._gather(trainer, "predict")
        if got is None:
            return
        probs, y = got
        scores = positive_scores(probs)
        d = self._dir(trainer)
        self.written["cali_score_file"] = write_score_file(d / "cali_score_file.csv", scores)
        if y is not None:
            self.written["cali_tag_file"] = write_tag_file(d / "cali_tag_file.csv", y)
        self.written["percentile_score"] = write_percentile_table(d / "percentile_score.pkl", scores)
        if self.plots:
            fig = score_distribution_figure(scores, y, title="calibration")
            self.written["cali_score_distribution"] = save_figure(fig, d / "cali_score_distribution.png")

