"""The LightningModules: step contract, input checks, training loop wiring, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _port_helpers import OUTPUT_TOL, lightning_batch
from torch.utils.data import DataLoader

from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification
from lightning_port.weight_map import legacy_to_port
from parity.fixtures import LEGACY_DIR, load_case

SINGLE = load_case(LEGACY_DIR / "single_small")
DUAL = load_case(LEGACY_DIR / "dual_small")


def module_for(case, **kw):
    cls = TemporalSelfAttentionClassification if case.kind == "single" else DualSequenceTSA
    m = cls(**case.kwargs, **kw)
    m.network.load_state_dict(legacy_to_port(case.state_dict, m.config, case.kind))
    return m


def loader(case, batch_size=3):
    batch = lightning_batch(case)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(case.batch_size)]
    return DataLoader(samples, batch_size=batch_size)


@pytest.mark.parametrize("case", [SINGLE, DUAL], ids=["single", "dual"])
def test_shared_step_contract_and_parity(case):
    m = module_for(case).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        out = m.predict_step(lightning_batch(case), 0)
    assert set(out) == {"logits", "probs", "y"}
    torch.testing.assert_close(out["logits"], case.expected["eval_seed7_scores"], **OUTPUT_TOL)
    assert out["probs"].dtype == torch.float32 and not out["probs"].requires_grad
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(case.batch_size))
    m.train()
    torch.manual_seed(9)
    out = m._step(lightning_batch(case), "predict")
    torch.testing.assert_close(out["loss"], case.expected["train_seed9_loss"], **OUTPUT_TOL)  # CE sum


def test_time_to_last_may_be_two_dimensional_and_y_may_be_absent():
    m = module_for(SINGLE).eval()
    batch = lightning_batch(SINGLE)
    batch["time_to_last"] = batch["time_to_last"][..., 0]
    del batch["y"]
    torch.manual_seed(7)
    with torch.no_grad():
        out = m.predict_step(batch, 0)
    assert set(out) == {"logits", "probs"}


@pytest.mark.parametrize(("edit", "words"), [
    (lambda b: b.update(x_seq_cat=b["x_seq_cat"][:, :, :-1]), "x_seq_cat has shape (6, 7, 5), expected (6, 7, 6)"),
    (lambda b: b["x_seq_cat"].__setitem__((0, 0, 0), 36.0), "x_seq_cat has codes outside 0..35"),
    (lambda b: b["x_seq_num"].__setitem__((0, 0, 0), float("nan")), "x_seq_num contains NaN or inf"),
    (lambda b: b.update(not_padded=b["not_padded"][:, :-1]), "not_padded has shape (6, 6), expected (6, 7)"),
    (lambda b: b.update(x_engineered_num=b["x_engineered_num"][:, :2]), "x_engineered has shape (6, 2)"),
    (lambda b: b["y"].__setitem__(0, 5), "y has labels outside 0..1"),
])
def test_input_checks_name_the_tensor(edit, words):
    m = module_for(SINGLE)
    batch = {k: v.clone() for k, v in lightning_batch(SINGLE).items()}
    edit(batch)
    with pytest.raises(ValueError, match=".") as info:
        m.training_step(batch, 0)
    assert words in str(info.value)


def test_forward_checks_mask_length():
    m = module_for(SINGLE)
    i = SINGLE.inputs
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(6, 7\), expected \(6, 8\)"):
        m(i["x_cat"], i["x_num"], i["x_engineered"], i["time_seq"], None, i["key_padding_mask"][:, :-1])


@pytest.mark.parametrize(("case", "loss"), [(SINGLE, "CrossEntropyLoss"), (DUAL, "Cyclical_FocalLoss")],
                         ids=["single-ce", "dual-cyclical"])
def test_fit_logs_metrics_and_checkpoint_reloads_with_override(case, loss, tmp_path):
    m = module_for(case, loss=loss, max_epochs=4)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, loader(case), loader(case))
    logged = set(trainer.callback_metrics)
    for name in ("train/loss", "val/loss", "val/auroc", "val/pr_auc", "val/precision", "val/recall", "val/f1",
                 "val/accuracy", "val/specificity"):
        assert name in logged, name
    if case.kind == "dual":
        assert {"val/gate_cid", "val/gate_ccid", "val/card_skipped"} <= logged
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "epoch" and sched.scheduler.total_steps == 4 and sched.scheduler.last_epoch == 2
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    cls = type(m)
    again = cls.load_from_checkpoint(path)
    assert again.hparams.moe_eval_policy == "random" and again.hparams.loss == loss
    other = cls.load_from_checkpoint(path, moe_eval_policy="threshold")
    assert other.config.moe_eval_policy == "threshold"
    for (k, a), b in zip(m.network.state_dict().items(), other.network.state_dict().values()):
        assert torch.equal(a, b), k


def test_fit_trains_in_train_mode_even_from_an_eval_module():
    """The legacy loop calls model.train() every epoch; Lightning 2.6 keeps the mode the module is handed."""
    m = module_for(SINGLE).eval()
    modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append(all(x.training for x in module.modules()))

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            modes.append(any(x.training for x in module.modules()))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()],
                        num_sanity_val_steps=0)
    trainer.fit(m, loader(SINGLE), loader(SINGLE))
    n_train = len(loader(SINGLE))
    assert modes == ([True] * n_train + [False] * n_train) * 2


def test_from_config_ignores_unknown_keys_and_reads_aliases():
    cfg = {"modelname": "OrderFeature", "model": dict(SINGLE.kwargs), "training": {"max_epoch": 7, "max_lr": 5e-4},
           "unknown": 1}
    m = TemporalSelfAttentionClassification.from_config(cfg)
    assert m.hparams.max_epochs == 7 and m.hparams.scheduler_maxlr == 5e-4
    assert m.config.n_cat_features == SINGLE.kwargs["n_cat_features"]


def test_step_interval_uses_estimated_stepping_batches():
    m = module_for(SINGLE, scheduler_interval="step")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(m, loader(SINGLE))
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step" and sched.scheduler.total_steps == 2
