"""The legacy training semantics library in reference/training.py."""

import pickle

import numpy as np
import pytest
import torch

from parity.fixtures import LEGACY_DIR, load_case
from reference import build_model
from reference.losses import Cyclical_FocalLoss, FocalLoss
from reference.training import (
    LegacyDataset,
    evaluate,
    key_padding_mask,
    legacy_auc,
    load_split,
    make_optimizer,
    percentile_table,
    set_loss,
    train_one_epoch,
    write_score_files,
)


def test_key_padding_mask_leaves_dummy_slot_unmasked():
    not_padded = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = key_padding_mask(not_padded)
    assert mask.dtype == torch.bool and mask.shape == (3, 4)
    assert mask.tolist() == [[True, True, False, False], [False, False, False, False], [True, True, True, False]]


def test_set_loss_names_and_legacy_reductions():
    ce = set_loss("CrossEntropyLoss")
    assert isinstance(ce, torch.nn.CrossEntropyLoss) and ce.reduction == "sum"
    assert isinstance(set_loss("FocalLoss"), FocalLoss)
    cyc = set_loss("Cyclical_FocalLoss", max_epoch=12)
    assert isinstance(cyc, Cyclical_FocalLoss) and cyc.epochs == 12 and cyc.reduction == "sum"
    with pytest.raises(ValueError, match="unknown loss"):
        set_loss("Nope")


def test_onecycle_stepped_per_epoch_matches_recorded_lrs():
    case = load_case(LEGACY_DIR / "single_small")
    model = build_model("single", **case.kwargs)
    opt, sched = make_optimizer(model, lr=1e-5, scheduler_maxlr=1e-3, max_epoch=4)
    lrs = []
    for _ in range(3):
        lrs += [opt.param_groups[0]["lr"]] * 2
        opt.step()  # no gradients: a no-op that keeps the scheduler's step-order check quiet
        sched.step()
    assert lrs == pytest.approx(case.trajectory["lr"], rel=1e-12)


def write_layout(tmp_path, n=12, L=5, n_cat=3, n_num=2, n_eng=2, kind="single", split="vali"):
    rng = np.random.default_rng(0)
    def seq():
        num = rng.normal(size=(n, L, n_num + 2)).astype(np.float32)
        num[:, :, -2] = rng.uniform(0, 1e5, size=(n, L))
        num[:, :, -1] = 1.0
        cat = rng.integers(1, 10, size=(n, L, n_cat)).astype(np.float32)
        return cat, num
    if kind == "single":
        cat, num = seq()
        np.save(tmp_path / f"{split}_X_seq_cat_v0.npy", cat)
        np.save(tmp_path / f"{split}_X_seq_num_v0.npy", num)
    else:
        for s in ("cid", "ccid"):
            cat, num = seq()
            np.save(tmp_path / f"{split}_{s}_X_seq_cat_v0.npy", cat)
            np.save(tmp_path / f"{split}_{s}_X_seq_num_v0.npy", num)
    np.save(tmp_path / f"{split}_X_num_v0.npy", rng.normal(size=(n, n_eng)).astype(np.float32))
    np.save(tmp_path / f"{split}_Y_v0.npy", (np.arange(n) % 2).reshape(n, 1))


@pytest.mark.parametrize("kind", ["single", "dual"])
def test_numpy_layout_reader_splits_time_and_padding_columns(tmp_path, kind):
    write_layout(tmp_path, kind=kind)
    arrays = load_split(tmp_path, "vali", kind=kind, layout="flat")
    sfx = "" if kind == "single" else "_cid"
    assert arrays[f"x_seq_num{sfx}"].shape == (12, 5, 2)
    assert arrays[f"time_to_last{sfx}"].shape == (12, 5, 1)
    assert arrays[f"not_padded{sfx}"].shape == (12, 5)
    assert arrays["y"].shape == (12,)
    item = LegacyDataset(arrays)[3]
    assert item["y"].dtype == torch.int64 and item[f"x_seq_cat{sfx}"].dtype == torch.float32


def test_missing_file_is_named(tmp_path):
    write_layout(tmp_path)
    (tmp_path / "vali_X_num_v0.npy").unlink()
    with pytest.raises(FileNotFoundError, match="vali_X_num_v0.npy"):
        load_split(tmp_path, "vali", layout="flat")


def test_train_epoch_and_evaluate_on_numpy_layout(tmp_path):
    write_layout(tmp_path, n=16, L=5, n_cat=3, n_num=2, n_eng=2)
    arrays = load_split(tmp_path, "vali", layout="flat")
    loader = torch.utils.data.DataLoader(LegacyDataset(arrays), batch_size=8)
    model = build_model("single", seed=0, n_cat_features=3, n_num_features=2, n_classes=2, n_embedding=12,
                        seq_len=5, n_engineered_num_features=2, dim_embedding_table=4, dim_attn_feedforward=8,
                        num_experts=2)
    opt, sched = make_optimizer(model, max_epoch=2)
    seen = []
    losses = train_one_epoch(model, loader, opt, set_loss("CrossEntropyLoss"), epoch=0, before_step=seen.append)
    assert len(losses) == 2 and seen == [0, 1] and all(np.isfinite(losses))
    probs, labels, total = evaluate(model, loader, loss_fn=set_loss("CrossEntropyLoss"))
    assert probs.shape == (16,) and labels.shape == (16,) and np.isfinite(total)
    auc = legacy_auc(labels, probs)
    assert 0.0 <= auc <= 1.0


def test_score_files_and_percentile_table(tmp_path):
    scores = np.array([0.25, 0.5, 0.125, 1 / 3], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    cali = np.linspace(0, 1, 101, dtype=np.float32)
    write_score_files(tmp_path, scores, labels, cali, np.zeros(101, dtype=int))
    assert (tmp_path / "score_file.csv").read_text() == "0.25\n0.5\n0.125\n0.33333334\n"
    assert (tmp_path / "tag_file.csv").read_text() == "0\n1\n0\n1\n"
    assert len((tmp_path / "cali_score_file.csv").read_text().splitlines()) == 101
    with open(tmp_path / "percentile_score.pkl", "rb") as f:
        table = pickle.load(f)
    assert len(table) == 1000 and table[0][1] == 0.0 and table[999][1] == 0.999
    assert table[500][0] == pytest.approx(0.5) and table == percentile_table(cali)
