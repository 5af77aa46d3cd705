"""A fit killed mid-epoch and resumed from last.ckpt ends with the weights of an uninterrupted fit
(reseed-per-step protocol: ``torch.manual_seed(base + global_step)`` before every training step)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_port import TemporalSelfAttentionClassification
from lightning_port.data import TSADataModule
from lightning_port.synth import SynthConfig, write_dataset
from lightning_port.trainer import ReseedPerStep, build_trainer

BATCH = 32
ROWS = 160  # 5 batches per epoch
KILL_AT_STEP = 8  # mid-epoch 1 (steps 6..10); last.ckpt refreshed every 3 steps -> resumes from step 6


class Killed(RuntimeError):
    pass


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


class RecordBatches(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, batch["row_index"].tolist()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_dataset(d, SynthConfig(kind="single", rows=ROWS, eval_rows=64, seed=7))
    return d


def _model() -> TemporalSelfAttentionClassification:
    pl.seed_everything(0, verbose=False)
    return TemporalSelfAttentionClassification(
        n_cat_features=6, n_num_features=5, n_classes=2, n_embedding=40, seq_len=8, n_engineered_num_features=3,
        dim_embedding_table=8, dim_attn_feedforward=16, dropout=0.3, use_moe=False, use_time_seq=True,
        lr=1e-3, scheduler_maxlr=1e-2, max_epochs=3,
    )


def _fit(root, data_dir, extra=(), ckpt_path=None):
    record = RecordBatches()
    trainer = build_trainer(
        accelerator="cpu", devices=1, max_epochs=3, default_root_dir=str(root), reseed_per_step=1234,
        last_every_n_train_steps=3, progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        score_writer=False, callbacks=[record, *extra],
    )
    model = _model()
    dm = TSADataModule(str(data_dir), batch_size=BATCH, seed=11)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer, record


def test_killed_mid_epoch_then_resumed_matches_uninterrupted(tmp_path, data_dir):
    ref_model, ref_trainer, ref_rec = _fit(tmp_path / "ref", data_dir)
    assert ref_trainer.global_step == 15

    with pytest.raises(Killed):
        _fit(tmp_path / "run", data_dir, extra=[KillAt(KILL_AT_STEP)])
    last = tmp_path / "run" / "tsa" / "version_0" / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    assert (ck["global_step"], ck["epoch"]) == (6, 1), "a mid-epoch checkpoint"

    model, trainer, rec = _fit(tmp_path / "run", data_dir, ckpt_path=str(last))
    assert trainer.global_step == 15
    # the resumed fit sees exactly the batches the uninterrupted one saw from step 6 on
    assert rec.seen == [s for s in ref_rec.seen if s[0] >= 6]
    ref_sd, sd = ref_model.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_reseed_per_step_callback_seeds_by_global_step():
    class T:
        global_step = 41

    cb = ReseedPerStep(base=1000)
    cb.on_train_batch_start(T(), None, None, 0)
    a = torch.rand(3)
    torch.manual_seed(1041)
    assert torch.equal(a, torch.rand(3))
