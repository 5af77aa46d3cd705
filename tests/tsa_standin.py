"""A tiny LightningModule with the TSA modules' batch and output contract, for testing the training
pipeline (data, trainer, callbacks, CLI) independently of ``lightning_port.module``.

Batch keys as ``TSADataModule`` yields them; ``test_step`` / ``predict_step`` return
``{"loss", "logits", "probs", "y"}``; logs ``val/auroc``; Adam + OneCycleLR stepped per epoch like
the legacy loop; dropout so that reseeding matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import pytorch as pl
from torch import nn
from torchmetrics.classification import BinaryAUROC


class StandInTSA(pl.LightningModule):
    def __init__(
        self,
        n_cat_features: int = 6,
        n_num_features: int = 5,
        n_classes: int = 2,
        n_embedding: int = 40,
        seq_len: int = 8,
        n_engineered_num_features: int = 3,
        dim_embedding_table: int = 8,
        dropout: float = 0.1,
        lr: float = 1e-3,
        scheduler_maxlr: float = 1e-2,
        max_epochs: int = 3,
        dual: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        D = dim_embedding_table
        self.embedding = nn.Embedding(n_embedding + 2, D, padding_idx=0)
        width = n_cat_features * D + n_num_features + 1 + n_engineered_num_features
        self.head = nn.Sequential(nn.Linear(width * (2 if dual else 1), 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, n_classes))
        self.val_auroc = BinaryAUROC()

    def _seq(self, batch: dict, sfx: str) -> torch.Tensor:
        cat = batch[f"x_seq_cat{sfx}"][:, -1].long()  # (B, n_cat) current transaction
        emb = self.embedding(cat).flatten(1)
        num = batch[f"x_seq_num{sfx}"][:, -1]
        hist = batch[f"not_padded{sfx}"].sum(1, keepdim=True) / batch[f"not_padded{sfx}"].shape[1]
        return torch.cat([emb, num, hist], dim=1)

    def forward(self, batch: dict) -> torch.Tensor:
        sfx = ["_cid", "_ccid"] if self.hparams.dual else [""]
        x = torch.cat([self._seq(batch, s) for s in sfx] + [batch["x_engineered_num"]], dim=1)
        return self.head(x)

    def _out(self, batch: dict) -> dict:
        logits = self(batch)
        out = {"logits": logits, "probs": F.softmax(logits, dim=-1).float()}
        if "y" in batch:
            out["loss"] = F.cross_entropy(logits, batch["y"], reduction="sum")
            out["y"] = batch["y"]
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._out(batch)
        self.log("train/loss", out["loss"])
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._out(batch)
        self.val_auroc.update(out["probs"][:, -1], batch["y"])
        self.log("val/loss", out["loss"])

    def on_validation_epoch_end(self) -> None:
        self.log("val/auroc", self.val_auroc.compute(), prog_bar=True)
        self.val_auroc.reset()

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._out(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = self._out(batch)
        out.pop("loss", None)
        return out

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.scheduler_maxlr, total_steps=self.hparams.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
