"""Trainer factory for the TSA port (the ``trainer`` section of the ``tsa`` CLI).

``build_trainer(...)`` returns a ``lightning.pytorch.Trainer`` with:

- accelerator ``auto`` (GPU when present), ``strategy`` ``auto`` / ``ddp`` / ``ddp_spawn`` / ``fsdp``
  (FSDP wraps the order and feature attention stacks and the attention layers, see
  :func:`fsdp_wrap_classes`), ``precision`` ``32`` / ``16-mixed`` / ``bf16-mixed`` (``16-mixed`` is float16
  autocast with a GradScaler on every device, CPU included: see :func:`mixed_precision_plugin`), optional
  gradient clipping and accumulation (the legacy loop had neither: both off by default);
- callbacks: ``ModelCheckpoint`` on ``val/auroc`` (max, best file ``best-epochEE-stepS.ckpt``, plus
  ``last.ckpt``), ``EarlyStopping(patience)`` on the same metric — or, with ``legacy_selection=True``,
  the legacy loop's rules (:mod:`lightning_port.selection`: the validation AUC computed and rounded as
  the legacy does, logged as ``val/auc_legacy``, the strict best-model rule and the legacy early-stopping
  tie rule) — ``LearningRateMonitor``,
  ``DeviceStatsMonitor`` (``device_stats=True``), a TQDM progress bar, the :class:`ScoreWriter`
  (legacy score files and plots on test / predict) and, with ``reseed_per_step=BASE``,
  :class:`ReseedPerStep`; ``last_every_n_train_steps`` also refreshes ``last.ckpt`` mid-epoch so a
  killed fit can resume close to where it stopped;
- a ``TensorBoardLogger`` under ``default_root_dir/<logger_name>/version_N`` (hyperparameters,
  curves, the ROC/PR figure); checkpoints go to its ``checkpoints/`` subdirectory and the score
  files next to it.

Legacy DDP ran with ``find_unused_parameters=True`` (the legacy model has parameters without
gradients, legacy-tsa §10); ``find_unused_parameters`` keeps that default and can be turned off
for the port's network.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    Callback,
    DeviceStatsMonitor,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_port.scoring import ScoreWriter
from lightning_port.selection import (
    LEGACY_MONITOR,
    LegacyBestCheckpoint,
    LegacyEarlyStopping,
    LegacyValAUC,
    legacy_selection_problem,
)

__all__ = [
    "BEST_FILENAME",
    "FSDP_WRAP_CLASS_NAMES",
    "MONITOR",
    "ReseedPerStep",
    "build_trainer",
    "fsdp_wrap_classes",
    "make_strategy",
    "mixed_precision_plugin",
]

log = logging.getLogger(__name__)

MONITOR = "val/auroc"
BEST_FILENAME = "best-epoch{epoch:02d}-step{step}"
# Module classes FSDP wraps as units, looked up by name in ``lightning_port.nn`` (absent ones are skipped):
# the order / feature attention stacks and their attention layers.
FSDP_WRAP_CLASS_NAMES = (
    "OrderAttentionModule",
    "FeatureAttentionModule",
    "AttentionLayerPostNorm",
    "AttentionLayerPreNorm",
    "AttentionLayer",
)

Strategy = Literal["auto", "ddp", "ddp_spawn", "fsdp"]
Precision = Literal["32", "32-true", "16-mixed", "bf16-mixed", "bf16-true"]


class ReseedPerStep(Callback):
    """``torch.manual_seed(base + global_step)`` before every training step.

    The training-step RNG stream (dropout, MoE coin flips) then depends only on the step number:
    a fit resumed from a checkpoint draws what the uninterrupted fit drew (the legacy parity
    protocol, design.md "training").
    """

    def __init__(self, base: int = 0) -> None:
        self.base = int(base)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(self.base + trainer.global_step)


def fsdp_wrap_classes(names: tuple[str, ...] = FSDP_WRAP_CLASS_NAMES) -> set[type[torch.nn.Module]]:
    """The classes of ``names`` that ``lightning_port.nn`` defines (imported lazily)."""
    try:
        nn_mod = importlib.import_module("lightning_port.nn")
    except ImportError as e:  # pragma: no cover - the nn package is part of the port
        log.warning("lightning_port.nn not importable (%s): FSDP wraps the root module only", e)
        return set()
    found = {getattr(nn_mod, n) for n in names if isinstance(getattr(nn_mod, n, None), type)}
    return {c for c in found if issubclass(c, torch.nn.Module)}


def _runs_on_cpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def mixed_precision_plugin(precision: str | int, accelerator: str = "auto") -> Any:
    """The explicit Lightning precision plugin for ``16-mixed`` on CPU, else ``None`` (the flag is enough).

    Lightning turns ``Trainer(accelerator="cpu", precision="16-mixed")`` into ``bf16-mixed`` without a loss
    scaler (one warning line). The legacy AMP recipe (``use_amp`` 1, legacy-tsa §12) is float16 autocast
    with a GradScaler, and torch runs float16 autocast on CPU, so on CPU ``16-mixed`` gets
    ``MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))``: the same dtype and loss
    scaling as on a GPU (slow on most CPUs, but the recipe the user asked for; ``bf16-mixed`` is the fast
    CPU choice).
    """
    if str(precision) not in ("16-mixed", "16") or not _runs_on_cpu(accelerator):
        return None
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def make_strategy(strategy: str, find_unused_parameters: bool = True, sharding_strategy: str = "FULL_SHARD") -> Any:
    """``auto`` and other Lightning names pass through; ``ddp``/``ddp_spawn``/``fsdp`` get TSA settings."""
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=find_unused_parameters)
    if strategy == "ddp_spawn":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn", find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        classes = fsdp_wrap_classes()
        return FSDPStrategy(
            auto_wrap_policy=ModuleWrapPolicy(classes) if classes else None,
            sharding_strategy=sharding_strategy,
            use_orig_params=True,  # parameters without gradients (legacy-tsa §10) stay legal
        )
    return strategy


def build_trainer(
    *,
    accelerator: str = "auto",
    devices: list[int] | str | int = "auto",
    num_nodes: int = 1,
    strategy: Strategy | str = "auto",
    precision: Precision = "32",
    max_epochs: int | None = 70,
    min_epochs: int | None = None,
    max_steps: int = -1,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: Literal["norm", "value"] = "norm",
    accumulate_grad_batches: int = 1,
    patience: int = 10,
    monitor: str = MONITOR,
    legacy_selection: bool = False,
    device_stats: bool = False,
    progress_bar: bool = True,
    progress_refresh_rate: int = 10,
    reseed_per_step: int | None = None,
    last_every_n_train_steps: int | None = None,
    find_unused_parameters: bool = True,
    fsdp_sharding_strategy: str = "FULL_SHARD",
    default_root_dir: str = "runs",
    logger_name: str = "tsa",
    logger_version: int | str | None = None,
    log_every_n_steps: int = 50,
    val_check_interval: int | float | None = None,
    check_val_every_n_epoch: int | None = 1,
    num_sanity_val_steps: int | None = None,
    limit_train_batches: int | float | None = None,
    limit_val_batches: int | float | None = None,
    limit_test_batches: int | float | None = None,
    limit_predict_batches: int | float | None = None,
    deterministic: bool | None = None,
    benchmark: bool | None = None,
    score_writer: bool = True,
    plots: bool = True,
    enable_model_summary: bool = True,
    fast_dev_run: bool | int = False,
    callbacks: list[Callback] | Callback | None = None,
) -> pl.Trainer:
    """Build the TSA trainer (see the module docstring).

    Args:
        strategy: ``auto``, ``ddp``, ``ddp_spawn``, ``fsdp`` or any Lightning strategy name.
        precision: ``32``, ``16-mixed`` (float16 autocast with a GradScaler like the legacy loop, on CUDA and,
            through :func:`mixed_precision_plugin`, on CPU) or ``bf16-mixed`` (no scaler).
        gradient_clip_val: clip gradients (by ``gradient_clip_algorithm``); ``None`` = off (legacy).
        patience: early-stopping patience in validation checks on ``monitor``; ``None`` or ``0``: no early stopping.
        monitor: the metric of the best checkpoint and of early stopping (Lightning's rules).
        legacy_selection: select the best checkpoint and stop as the legacy loop does (see
            :mod:`lightning_port.selection`): monitor ``val/auc_legacy`` (sklearn AUC over the validation set,
            ``round(auc, 4)``), save on a strict improvement, reset the early-stopping counter on a tie.
            Needs validation once per epoch (``val_check_interval`` 1.0, ``check_val_every_n_epoch`` 1) and a
            2-class model; ``monitor`` is then ignored.
        reseed_per_step: seed base of :class:`ReseedPerStep`; ``None`` = no reseeding.
        last_every_n_train_steps: also save ``last.ckpt`` every N optimizer steps.
        logger_version: TensorBoard version to log into (``None`` = next free ``version_N``).
        score_writer: add :class:`ScoreWriter` (legacy score files on test / predict).
        callbacks: extra callbacks (the CLI adds its own here).
    """
    cbs: list[Callback] = []
    if legacy_selection:
        problem = legacy_selection_problem(val_check_interval, check_val_every_n_epoch)
        if problem:
            raise ValueError(problem)
        cbs.append(LegacyValAUC(LEGACY_MONITOR))
        cbs.append(LegacyBestCheckpoint(LEGACY_MONITOR, save_last=True, filename=BEST_FILENAME,
                                        auto_insert_metric_name=False))
    else:
        cbs.append(ModelCheckpoint(
            monitor=monitor,
            mode="max",
            save_top_k=1,
            save_last=True,
            filename=BEST_FILENAME,
            auto_insert_metric_name=False,
        ))
    if last_every_n_train_steps:
        cbs.append(
            ModelCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=int(last_every_n_train_steps))
        )
    if patience is not None and patience > 0:
        if legacy_selection:
            cbs.append(LegacyEarlyStopping(LEGACY_MONITOR, patience=patience))
        else:
            cbs.append(EarlyStopping(monitor=monitor, mode="max", patience=patience))
    cbs.append(LearningRateMonitor())
    if device_stats:
        cbs.append(DeviceStatsMonitor())
    if progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=progress_refresh_rate))
    if score_writer:
        cbs.append(ScoreWriter(plots=plots))
    if reseed_per_step is not None:
        cbs.append(ReseedPerStep(reseed_per_step))
    if callbacks is not None:
        cbs.extend(callbacks if isinstance(callbacks, list) else [callbacks])

    logger = TensorBoardLogger(save_dir=default_root_dir, name=logger_name, version=logger_version, default_hp_metric=False)
    optional = {
        "min_epochs": min_epochs,
        "gradient_clip_val": gradient_clip_val,
        "val_check_interval": val_check_interval,
        "num_sanity_val_steps": num_sanity_val_steps,
        "limit_train_batches": limit_train_batches,
        "limit_val_batches": limit_val_batches,
        "limit_test_batches": limit_test_batches,
        "limit_predict_batches": limit_predict_batches,
        "deterministic": deterministic,
        "benchmark": benchmark,
    }
    plugin = mixed_precision_plugin(precision, accelerator)
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=make_strategy(strategy, find_unused_parameters, fsdp_sharding_strategy),
        precision=None if plugin is not None else precision,
        plugins=[plugin] if plugin is not None else None,
        max_epochs=max_epochs,
        max_steps=max_steps,
        gradient_clip_algorithm=gradient_clip_algorithm if gradient_clip_val else None,
        accumulate_grad_batches=accumulate_grad_batches,
        callbacks=cbs,
        logger=logger,
        default_root_dir=default_root_dir,
        log_every_n_steps=log_every_n_steps,
        check_val_every_n_epoch=check_val_every_n_epoch,
        enable_progress_bar=progress_bar,
        enable_model_summary=enable_model_summary,
        fast_dev_run=fast_dev_run,
        **{k: v for k, v in optional.items() if v is not None},
    )
