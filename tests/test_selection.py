"""Legacy-compatible selection (``build_trainer(legacy_selection=True)``) vs Lightning's own callbacks.

The main test drives both trainer modes through ``Trainer.fit`` on a recorded validation-AUC sequence with
ties at 4 decimals. A stand-in module produces, at each epoch, validation scores whose AUC is exactly
``C / (200 * 500)`` (200 positives, 500 negatives, positive i ranked above ``c_i`` negatives, no tied
scores), so sklearn (legacy mode) and torchmetrics (Lightning mode, ``val/auroc``) both see the recorded
value. The expected epochs are derived by hand from the documented rules (docs/divergences.md #12).
"""

from __future__ import annotations

import decimal

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchmetrics
from torch.utils.data import DataLoader

from lightning_port.selection import LEGACY_MONITOR, legacy_round, legacy_validation_auc
from lightning_port.trainer import build_trainer
from reference.training import EarlyStopping

N_POS, N_NEG = 200, 500  # 1e5 pairs: AUC resolution 1e-5

# Recorded per-epoch validation AUCs (epoch 0 first), rounded by the legacy to:
# .7000 .8000 .8000 .8000 .8000 .8001 .8001 .7999 .8001 .8000 .7900 .9500
AUC_SEQUENCE = [0.70000, 0.80002, 0.80004, 0.80004, 0.80001, 0.80006, 0.80014, 0.79990, 0.80010, 0.80000,
                0.79000, 0.95000]
PATIENCE = 2
# Derived by hand (patience 2):
# Lightning (unrounded, strict ">" for both callbacks, a tie counts as no improvement):
#   e0 best; e1 .80002 > .7 best; e2 .80004 > .80002 best; e3 .80004 tie: kept e2, wait 1;
#   e4 .80001 < .80004: wait 2 -> stop after epoch 4. Best epoch 2, 5 epochs trained.
LIGHTNING_BEST, LIGHTNING_STOP = 2, 4
# Legacy (rounded; best on strict ">", early stopping: only "<" counts, a tie resets):
#   e0 .7 best; e1 .8 best; e2-e4 .8 ties: best stays e1, counter reset; e5 .8001 best; e6 .8001 tie (reset);
#   e7 .7999 counter 1; e8 .8001 tie (reset); e9 .8000 counter 1; e10 .79 counter 2 -> stop after epoch 10.
#   Best epoch 5, 11 epochs trained.
LEGACY_BEST, LEGACY_STOP = 5, 10


def scores_with_auc(auc: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (N, 2), y (N,)) whose binary AUC is exactly round(auc * 1e5) / 1e5."""
    pairs = round(auc * N_POS * N_NEG)
    neg = (np.arange(N_NEG) + 1.0) / (N_NEG + 2)  # distinct scores
    above = np.full(N_POS, pairs // N_POS)
    above[: pairs % N_POS] += 1  # positive i is above `above[i]` negatives
    pos = (above + 0.5) / (N_NEG + 2)
    p1 = torch.tensor(np.concatenate([pos, neg]), dtype=torch.float32)
    y = torch.cat([torch.ones(N_POS, dtype=torch.long), torch.zeros(N_NEG, dtype=torch.long)])
    return torch.stack([1 - p1, p1], dim=1), y


class RecordedAUC(pl.LightningModule):
    """Validation epoch e yields scores with AUC_SEQUENCE[e]; logs val/auroc like the port's module."""

    def __init__(self, sequence):
        super().__init__()
        self.save_hyperparameters({"n_classes": 2})
        self.sequence = sequence
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.auroc = torchmetrics.AUROC(task="binary")
        self.validated: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        probs, y = scores_with_auc(self.sequence[self.current_epoch])
        self.auroc.update(probs[:, 1], y)
        self.log("val/auroc", self.auroc, on_epoch=True, batch_size=len(y))
        self.validated.append(self.current_epoch)
        return {"probs": probs, "y": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, legacy_selection: bool, sequence=AUC_SEQUENCE, patience=PATIENCE):
    module = RecordedAUC(sequence)
    trainer = build_trainer(accelerator="cpu", devices=1, max_epochs=len(sequence), patience=patience,
                            legacy_selection=legacy_selection, default_root_dir=str(tmp_path), progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, score_writer=False,
                            log_every_n_steps=1)
    one = DataLoader([torch.zeros(1)], batch_size=None)
    trainer.fit(module, train_dataloaders=one, val_dataloaders=one)
    best = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False)
    return trainer, module, best


def test_recorded_sequence_scores_have_the_recorded_auc():
    for auc in AUC_SEQUENCE:
        probs, y = scores_with_auc(auc)
        assert legacy_validation_auc(y.numpy(), probs[:, 1].numpy()) == pytest.approx(auc, abs=1e-12)


def test_lightning_mode_picks_lightnings_epochs(tmp_path):
    trainer, module, best = fit(tmp_path, legacy_selection=False)
    assert module.validated == list(range(LIGHTNING_STOP + 1))
    assert best["epoch"] == LIGHTNING_BEST
    assert trainer.checkpoint_callback.monitor == "val/auroc"
    assert float(trainer.checkpoint_callback.best_model_score) == pytest.approx(AUC_SEQUENCE[LIGHTNING_BEST],
                                                                                 abs=1e-6)


def test_legacy_mode_picks_the_legacy_epochs(tmp_path):
    trainer, module, best = fit(tmp_path, legacy_selection=True)
    assert module.validated == list(range(LEGACY_STOP + 1))
    assert best["epoch"] == LEGACY_BEST
    assert trainer.checkpoint_callback.monitor == LEGACY_MONITOR
    assert float(trainer.checkpoint_callback.best_model_score) == 0.8001
    stopper = next(cb for cb in trainer.callbacks if type(cb).__name__ == "LegacyEarlyStopping")
    assert stopper.stop_epoch == LEGACY_STOP
    assert f"best-epoch{LEGACY_BEST:02d}-" in trainer.checkpoint_callback.best_model_path


def test_reference_early_stopping_agrees_with_the_hand_derivation():
    """The legacy EarlyStopping class of reference/ on the rounded sequence (called with -auc, as train.py)."""
    es = EarlyStopping(patience=PATIENCE, path=None)
    best_auc, best_epoch, stop = 0, None, None
    for epoch, raw in enumerate(AUC_SEQUENCE):
        auc = round(raw, 4)
        if auc > best_auc:
            best_auc, best_epoch = auc, epoch
        es(-auc, None)
        if es.early_stop:
            stop = epoch
            break
    assert (best_epoch, stop) == (LEGACY_BEST, LEGACY_STOP)


def test_without_a_stop_both_modes_run_every_epoch(tmp_path):
    rising = [0.6 + 0.01 * e for e in range(5)]
    for legacy in (False, True):
        _, module, best = fit(tmp_path / str(legacy), legacy_selection=legacy, sequence=rising)
        assert module.validated == list(range(5))
        assert best["epoch"] == 4


@pytest.mark.parametrize(("value", "expected"), [
    (0.12345, 0.1235),  # the float is 0.12345000000000000417...: above the tie
    (0.98765, 0.9877),  # 0.98765000000000002789...
    (0.11115, 0.1111),  # 0.11114999999999999658...: below the tie
    (0.03125, 0.0312),  # 1/32: an exact binary tie, to even
    (0.09375, 0.0938),  # 3/32: exact tie, to even
    (0.80004999999999, 0.8),
    (0.80005000000001, 0.8001),
])
def test_legacy_round_is_pythons_round_of_the_binary_value(value, expected):
    exact = decimal.Decimal(value)  # the float's exact binary value, written out
    tie = decimal.Decimal(str(expected)) + decimal.Decimal("0.00005") * (1 if expected < value else -1)
    assert (exact == tie) == (value in (0.03125, 0.09375))
    assert legacy_round(value) == expected
    assert legacy_round(np.float64(value)) == expected  # not numpy's scale-and-rint rounding


def test_numpy_rounding_differs_at_the_ties():
    """Why legacy_round converts to float: numpy's round (also round() on an np.float64) scales by 1e4."""
    assert round(np.float64(0.12345), 4) == 0.1234 != legacy_round(0.12345)
    assert round(np.float64(0.98765), 4) == 0.9876 != legacy_round(0.98765)


def test_legacy_selection_needs_validation_every_epoch_and_two_classes(tmp_path):
    with pytest.raises(ValueError, match="validates once at the end of every epoch"):
        build_trainer(legacy_selection=True, val_check_interval=0.5, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="validates once at the end of every epoch"):
        build_trainer(legacy_selection=True, check_val_every_n_epoch=2, default_root_dir=str(tmp_path))
    module = RecordedAUC([0.7])
    module.hparams["n_classes"] = 3
    trainer = build_trainer(accelerator="cpu", max_epochs=1, legacy_selection=True, default_root_dir=str(tmp_path),
                            progress_bar=False, enable_model_summary=False, score_writer=False)
    one = DataLoader([torch.zeros(1)], batch_size=None)
    with pytest.raises(ValueError, match="needs a 2-class model"):
        trainer.fit(module, train_dataloaders=one, val_dataloaders=one)


def test_legacy_auc_needs_two_classes():
    with pytest.raises(ValueError, match=r"1 class\(es\)"):
        legacy_validation_auc(np.zeros(5), np.linspace(0, 1, 5))


@pytest.mark.parametrize(("extra", "words"), [
    (["--trainer.val_check_interval", "0.5"], "validates once at the end of every epoch"),
    (["--model.init_args.n_classes", "3"], "needs a 2-class model"),
])
def test_tsa_cli_refuses_impossible_legacy_selection_in_one_line(tmp_path, capsys, extra, words):
    from pathlib import Path

    from lightning_port.cli import main as tsa

    config = Path(__file__).resolve().parents[1] / "configs" / "single_synthetic.yaml"
    with pytest.raises(SystemExit) as exit_info:
        tsa(["fit", "--config", str(config), "--data.data_dir", str(tmp_path), "--trainer.default_root_dir",
             str(tmp_path), "--trainer.legacy_selection", "true", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_legacy_val_auc_uses_each_validation_row_once():
    """Rows a distributed sampler repeats (same row_index) count once, in file order, as in the legacy AUC."""
    from types import SimpleNamespace

    from lightning_port.selection import LegacyValAUC

    cb = LegacyValAUC()
    trainer = SimpleNamespace(world_size=1, sanity_checking=False)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = torch.tensor([0, 1, 1, 0])
    batches = [{"row_index": torch.tensor([0, 1])}, {"row_index": torch.tensor([2, 3])},
               {"row_index": torch.tensor([2, 3])}]  # padding: rows 2 and 3 again
    for b, rows in zip(batches, ([0, 1], [2, 3], [2, 3])):
        cb.on_validation_batch_end(trainer, None, {"probs": probs[rows], "y": y[rows]}, b, 0)
    scores, labels = cb._gathered(trainer)
    np.testing.assert_array_equal(labels, [0, 1, 1, 0])
    np.testing.assert_allclose(scores, [0.1, 0.8, 0.4, 0.7])
    # pairs (pos, neg): (.8,.1) (.8,.7) (.4,.1) in order, (.4,.7) not: 3/4 (the repeats counted would give 5/9)
    assert legacy_validation_auc(labels, scores) == 0.75
