"""LightningModules of the TSA port: :class:`TemporalSelfAttentionClassification` (single sequence)
and :class:`DualSequenceTSA` (customer + card sequences).

- The plain network lives in the attribute ``network`` (a :class:`~lightning_port.nn.SingleSequenceNetwork`
  or :class:`~lightning_port.nn.DualSequenceNetwork`); :mod:`lightning_port.weight_map` maps its
  ``state_dict`` to and from the legacy one. In a Lightning checkpoint its keys are ``network.*``.
- ``forward`` takes the legacy model's positional arguments and returns ``(scores, ensemble)``.
- One shared ``_step`` serves train / validation / test / predict. Batches are dicts in the legacy
  dataset format (see :meth:`_TSAModule.batch_to_args`); every step returns
  ``{"loss", "logits" (B, C), "probs" (B, C) float32 detached softmax, "y" (B,)}`` (no ``loss``
  / ``y`` when the batch has no labels, e.g. in predict).
- Adam + OneCycleLR(max_lr=scheduler_maxlr, total_steps=max_epochs) stepped per epoch as the
  legacy loop (``scheduler_interval="step"``: per optimizer step, total from the trainer).
- Metrics per stage: ``{stage}/loss``, ``{stage}/auroc`` (``val/auroc`` is the primary one),
  ``pr_auc``, ``precision``, ``recall``, ``f1``, ``accuracy``, ``specificity``; binary on
  softmax[:, -1] with 2 classes, multiclass otherwise. The dual model also logs its gate.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from .config import TSAConfig
from .legacy_hparams import coerce_hyperparameters
from .losses import CyclicalFocalLoss, build_loss
from .nn import DualSequenceNetwork, SingleSequenceNetwork
from .nn.networks import GATE_KEEP_THRESHOLD

STAGES = ("train", "val", "test")
_CONFIG_ALIASES = {"max_epoch": "max_epochs", "learning_rate": "lr", "max_lr": "scheduler_maxlr",
                   "loss_fn": "loss", "gamma": "loss_gamma", "alpha": "loss_alpha"}


def _metrics(n_classes: int) -> torchmetrics.MetricCollection:
    if n_classes == 2:
        kw: dict[str, Any] = {"task": "binary"}
    else:
        kw = {"task": "multiclass", "num_classes": n_classes}
    return torchmetrics.MetricCollection({
        "auroc": torchmetrics.AUROC(**kw), "pr_auc": torchmetrics.AveragePrecision(**kw),
        "precision": torchmetrics.Precision(**kw), "recall": torchmetrics.Recall(**kw),
        "f1": torchmetrics.F1Score(**kw), "accuracy": torchmetrics.Accuracy(**kw),
        "specificity": torchmetrics.Specificity(**kw)})


def key_padding_mask(not_padded: Tensor) -> Tensor:
    """Legacy mask from ``not_padded`` (B, L): (B, L+1), True = ignore; the dummy slot is kept."""
    return torch.logical_not(F.pad(not_padded, (0, 1), value=True))


class _TSAModule(L.LightningModule):
    kind = ""
    network_class: type = SingleSequenceNetwork

    def __init__(
        self,
        n_cat_features: int,
        n_num_features: int,
        n_embedding: int,
        n_classes: int = 2,
        seq_len: int = 51,
        n_engineered_num_features: int = 0,
        dim_embedding_table: int = 128,
        dim_attn_feedforward: int = 64,
        use_mlp: int = 0,
        num_heads: int = 1,
        dropout: float = 0.1,
        n_layers_order: int = 1,
        n_layers_feature: int = 1,
        emb_tbl_use_bias: int = 1,
        use_moe: bool = True,
        num_experts: int = 5,
        use_time_seq: bool = True,
        moe_eval_policy: str = "random",
        batch_invariant: bool = False,
        activation_checkpointing: bool = False,
        fused_eval_attention: bool = False,
        legacy_rng: bool = True,
        compile: bool = False,
        card_rows: str = "subset",
        lr: float = 1e-5,
        scheduler_maxlr: float = 1e-3,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        max_epochs: int = 100,
        scheduler_interval: str = "epoch",
        loss: str = "CrossEntropyLoss",
        loss_gamma: float | None = None,
        loss_alpha: float | None = None,
        loss_reduction: str | None = None,
        gradient_clip_val: float | None = None,
        validate_inputs: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}.")
        cfg_names = {f for f in inspect.signature(TSAConfig).parameters}
        self.config = TSAConfig(**{k: v for k, v in self.hparams.items() if k in cfg_names})
        if self.kind == "dual":
            self.network = DualSequenceNetwork(self.config, card_rows=card_rows)
        else:
            self.network = SingleSequenceNetwork(self.config)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be a bool, got {compile!r}.")
        self.loss_fn = build_loss(loss, gamma=loss_gamma, alpha=loss_alpha, reduction=loss_reduction,
                                  epochs=max_epochs)
        self.stage_metrics = torch.nn.ModuleDict({f"{s}_metrics": _metrics(n_classes) for s in STAGES})

    # --- construction helpers ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _TSAModule:
        """Build from a config dict (flat, or with nested sections such as ``model`` /
        ``training``): the seed design's typed dicts, or legacy hyperparameters as SageMaker stores
        them. Values of ``train.py``'s keys are read by :func:`lightning_port.legacy_hparams.coerce_hyperparameters`
        (the one reader of legacy hyperparameters: strings parsed with ``train.py``'s types, SageMaker's
        double quoting undone, a bad value refused naming its key); legacy aliases (``max_epoch``,
        ``max_lr``, ...) are accepted and keys this module does not know are ignored. Keys the dict
        lacks keep this constructor's defaults; for a SageMaker job, whose absent keys mean ``train.py``'s
        defaults, build from ``legacy_hparams.read_hyperparameters(path).module_kwargs()``."""
        flat: dict[str, Any] = {}
        for key, value in config.items():
            if isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        flat = coerce_hyperparameters(flat, "config")
        flat = {_CONFIG_ALIASES.get(k, k): v for k, v in flat.items()}
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in flat.items() if k in names})

    # --- the network, compiled or not ----------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        """The callable forward of :attr:`network`: the module itself, or with ``compile=True`` its
        ``torch.compile`` wrapper (built on first use, not registered as a submodule, so the
        ``state_dict`` keys stay ``network.*``). With ``legacy_rng`` the compiled graph calls the eager
        random kernels (inductor's ``fallback_random``), so the legacy stream is kept; without it
        inductor draws its own random numbers inside the fused kernels."""
        if not self.hparams.get("compile", False):
            return self.network
        compiled = self.__dict__.get("_compiled_network")
        if compiled is None or compiled._orig_mod is not self.network:
            options = {"fallback_random": True} if self.config.legacy_rng else {}
            compiled = torch.compile(self.network, options=options)
            self.__dict__["_compiled_network"] = compiled
        return compiled

    def __getstate__(self):  # the compiled wrapper is rebuilt on first use (it does not pickle)
        state = dict(super().__getstate__())
        state.pop("_compiled_network", None)
        return state

    # --- input checks -----------------------------------------------------------------------
    def _check(self, name: str, t: Tensor | None, shape: tuple[int | None, ...], codes: bool = False) -> None:
        if t is None:
            raise ValueError(f"{name} is missing.")
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}.")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf.")
        if codes and t.numel():
            top = self.config.n_cat_codes
            if bool((t < 0).any()) or bool((t > top).any()):
                raise ValueError(f"{name} has codes outside 0..{top} (n_embedding - n_num_features).")

    def _check_sequence(self, suffix: str, x_cat, x_num, time_seq, kpm, B) -> None:
        c = self.config
        L_ = c.seq_len
        self._check(f"x_seq_cat{suffix}", x_cat, (B, L_, c.n_cat_features), codes=True)
        self._check(f"x_seq_num{suffix}", x_num, (B, L_, c.n_num_features))
        if time_seq is not None:
            self._check(f"time_seq{suffix}", time_seq, (B, L_, 1))
        if kpm is not None:
            self._check(f"key_padding_mask{suffix}", kpm, (B, L_ + 1))

    def _check_engineered(self, x_engineered, B) -> None:
        n_eng = self.config.n_engineered_num_features
        if n_eng:
            self._check("x_engineered", x_engineered, (B, n_eng))

    # --- steps ----------------------------------------------------------------------------
    def batch_to_args(self, batch: dict[str, Tensor]) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        scores, _ = self(*self.batch_to_args(batch))
        out: dict[str, Tensor] = {"logits": scores, "probs": torch.softmax(scores.detach().float(), dim=1)}
        y = batch.get("y")
        if y is not None:
            y = y.reshape(-1).long()
            if self.hparams.validate_inputs:
                self._check("y", y, (scores.shape[0],))
                if bool((y < 0).any()) or bool((y >= self.config.n_classes).any()):
                    raise ValueError(f"y has labels outside 0..{self.config.n_classes - 1}.")
            out["y"] = y
            if isinstance(self.loss_fn, CyclicalFocalLoss):
                self.loss_fn.epoch = self.current_epoch  # legacy eval loop crashed without it
            out["loss"] = self.loss_fn(scores, y)
            if stage in STAGES:
                B = scores.shape[0]
                self.log(f"{stage}/loss", out["loss"], on_step=stage == "train", on_epoch=True, batch_size=B)
                metrics = self.stage_metrics[f"{stage}_metrics"]
                target_scores = out["probs"][:, -1] if self.config.n_classes == 2 else out["probs"]
                metrics.update(target_scores, y)
                self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True,
                              batch_size=B)
        self._log_extra(stage, scores.shape[0])
        return out

    def _log_extra(self, stage: str, batch_size: int) -> None:
        pass

    def on_train_epoch_start(self) -> None:
        # The legacy loop calls model.train() at the top of every epoch. Lightning (>= 2.2) trains the module in
        # the mode it was handed: one put in eval mode before fit (to score it, say) would train without dropout.
        self.train()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        out = self._step(batch, "predict")
        out.pop("loss", None)
        return out

    # --- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2),
                               weight_decay=hp.weight_decay)
        if hp.scheduler_interval == "step":
            total = int(self.trainer.estimated_stepping_batches)
        else:
            total = hp.max_epochs  # legacy: one scheduler step per epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.scheduler_maxlr, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": hp.scheduler_interval}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.gradient_clip_val
        if clip:  # legacy: no clipping; only when asked (here or on the Trainer)
            self.clip_gradients(optimizer, gradient_clip_val=clip,
                                gradient_clip_algorithm=gradient_clip_algorithm or "norm")


class TemporalSelfAttentionClassification(_TSAModule):
    """Single-sequence TSA classifier (legacy ``OrderFeatureAttentionClassifier``) as a LightningModule."""

    kind = "single"

    def forward(self, x_cat: Tensor, x_num: Tensor, x_engineered: Tensor | None, time_seq: Tensor,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None):
        if self.hparams.validate_inputs:
            B = x_cat.shape[0] if x_cat.dim() else 0
            self._check_sequence("", x_cat, x_num, time_seq if self.config.use_time_seq else None,
                                 key_padding_mask, B)
            self._check_engineered(x_engineered, B)
        return self.net(x_cat, x_num, x_engineered, time_seq, attn_mask, key_padding_mask)

    def batch_to_args(self, batch: dict[str, Tensor]) -> tuple:
        """Legacy dataset dict -> forward arguments: ``x_seq_cat`` (B, L, n_cat), ``x_seq_num``
        (B, L, n_num), ``time_to_last`` (B, L, 1) or (B, L), ``not_padded`` (B, L),
        ``x_engineered_num`` (B, n_eng) (optional when n_eng = 0)."""
        x_cat = batch["x_seq_cat"]
        time_seq = batch["time_to_last"]
        if time_seq.dim() == 2:
            time_seq = time_seq.unsqueeze(-1)
        if self.hparams.validate_inputs:
            self._check("not_padded", batch.get("not_padded"), (x_cat.shape[0], self.config.seq_len))
        return (x_cat, batch["x_seq_num"], batch.get("x_engineered_num"), time_seq, None,
                key_padding_mask(batch["not_padded"]))


class DualSequenceTSA(_TSAModule):
    """Customer + card sequence TSA classifier (legacy ``TwoSeqMoEOrderFeatureAttentionClassifier``)
    as a LightningModule. Also logs ``{stage}/gate_cid``, ``{stage}/gate_ccid`` (mean weights) and
    ``{stage}/card_skipped`` (share of rows whose card sequence was not computed)."""

    kind = "dual"

    def forward(self, x_seq_cat_cid: Tensor, x_seq_num_cid: Tensor, time_seq_cid: Tensor,
                x_seq_cat_ccid: Tensor, x_seq_num_ccid: Tensor, time_seq_ccid: Tensor,
                x_engineered: Tensor | None, attn_mask: Tensor | None = None,
                key_padding_mask_cid: Tensor | None = None, key_padding_mask_ccid: Tensor | None = None):
        if self.hparams.validate_inputs:
            B = x_seq_cat_cid.shape[0] if x_seq_cat_cid.dim() else 0
            use_t = self.config.use_time_seq
            self._check_sequence("_cid", x_seq_cat_cid, x_seq_num_cid, time_seq_cid if use_t else None,
                                 key_padding_mask_cid, B)
            self._check_sequence("_ccid", x_seq_cat_ccid, x_seq_num_ccid, time_seq_ccid if use_t else None,
                                 key_padding_mask_ccid, B)
            if key_padding_mask_ccid is None:
                raise ValueError("key_padding_mask_ccid is missing (the card gate reads it).")
            self._check_engineered(x_engineered, B)
        return self.net(x_seq_cat_cid, x_seq_num_cid, time_seq_cid, x_seq_cat_ccid, x_seq_num_ccid,
                        time_seq_ccid, x_engineered, attn_mask, key_padding_mask_cid, key_padding_mask_ccid)

    def batch_to_args(self, batch: dict[str, Tensor]) -> tuple:
        """Legacy dual dataset dict: the single keys with ``_cid`` / ``_ccid`` suffixes on the
        sequence tensors, shared ``x_engineered_num`` and ``y``."""
        args = []
        masks = []
        for s in ("_cid", "_ccid"):
            time_seq = batch["time_to_last" + s]
            if time_seq.dim() == 2:
                time_seq = time_seq.unsqueeze(-1)
            if self.hparams.validate_inputs:
                self._check("not_padded" + s, batch.get("not_padded" + s),
                            (batch["x_seq_cat" + s].shape[0], self.config.seq_len))
            args += [batch["x_seq_cat" + s], batch["x_seq_num" + s], time_seq]
            masks.append(key_padding_mask(batch["not_padded" + s]))
        return (*args, batch.get("x_engineered_num"), None, *masks)

    def _log_extra(self, stage: str, batch_size: int) -> None:
        g = getattr(self.network, "last_gate", None)
        if g is None or stage not in STAGES:
            return
        self.log_dict({f"{stage}/gate_cid": g[:, 0].mean(), f"{stage}/gate_ccid": g[:, 1].mean(),
                       f"{stage}/card_skipped": (g[:, 1] <= GATE_KEEP_THRESHOLD).float().mean()},
                      on_step=False, on_epoch=True, batch_size=batch_size)
