"""tsa-synth: the legacy layout with padding, time gaps, empty card histories and a learnable signal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lightning_port.data import TSADataModule, layout_files
from lightning_port.synth import TIME_CAP, main


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dual")
    assert main(["--kind", "dual", "--out", str(d), "--rows", "600", "--seed", "3"]) == 0
    return d


def _arrays(d, split, kind):
    return {k: np.load(p) for k, p in layout_files(d, split, kind).items()}


def test_meta_and_row_counts(dual_dir):
    meta = json.loads((dual_dir / "meta.json").read_text())
    assert meta["kind"] == "dual"
    assert (meta["n_cat_features"], meta["n_num_features"], meta["n_engineered_num_features"]) == (6, 5, 3)
    assert (meta["n_embedding"], meta["seq_len"], meta["n_classes"]) == (40, 8, 2)
    assert meta["rows"] == {"train": 600, "vali": 150, "cali": 150}


@pytest.mark.parametrize("sfx", ["_cid", "_ccid"])
def test_left_padding_times_and_codes(dual_dir, sfx):
    a = _arrays(dual_dir, "train", "dual")
    cat, num = a[f"seq_cat{sfx}"], a[f"seq_num{sfx}"]
    real = num[..., -1]
    assert set(np.unique(real)) <= {0.0, 1.0}
    assert (real[:, -1] == 1).all(), "the current transaction is the last position"
    assert (np.diff(real, axis=1) >= 0).all(), "left padding: once real, real to the end"
    assert (cat[real == 0] == 0).all()
    assert (num[real == 0] == 0).all()
    codes = cat[real == 1]
    assert codes.min() >= 1
    assert codes.max() <= 40 - 5
    t = num[..., -2]
    assert (t[:, -1] == 0).all()
    assert t.min() >= 0
    assert t.max() <= TIME_CAP
    hist = real[:, :-1] == 1
    assert t[:, :-1][hist].max() > 1e5, "realistic gaps, not all zero"
    both = (real[:, :-1] == 1) & (real[:, 1:] == 1)
    assert (t[:, :-1][both] >= t[:, 1:][both]).all(), "time_to_last decreases towards the current transaction"


def test_dual_empty_card_histories_and_shared_current(dual_dir):
    a = _arrays(dual_dir, "train", "dual")
    card_len = a["seq_num_ccid"][..., -1].sum(1)
    assert 0.15 < (card_len == 1).mean() < 0.5, "some card histories hold only the current order"
    np.testing.assert_array_equal(a["seq_cat_cid"][:, -1], a["seq_cat_ccid"][:, -1])


def test_seeded_and_round_trip(tmp_path, dual_dir):
    main(["--kind", "dual", "--out", str(tmp_path), "--rows", "600", "--seed", "3"])
    for key, path in layout_files(tmp_path, "vali", "dual").items():
        np.testing.assert_array_equal(np.load(path), np.load(layout_files(dual_dir, "vali", "dual")[key]))
    dm = TSADataModule(str(tmp_path), kind="dual", batch_size=50, n_embedding=40, n_num_features=5)
    dm.setup("fit")
    dm.setup("predict")
    assert sum(len(b["y"]) for b in dm.train_dataloader()) == 600
    assert sum(len(b["y"]) for b in dm.predict_dataloader()) == 150


def test_signal_is_learnable(tmp_path):
    """A linear model on the current transaction alone separates the classes (oracle-ish check)."""
    main(["--kind", "single", "--out", str(tmp_path), "--rows", "2000", "--seed", "0"])

    def features(split):
        a = _arrays(tmp_path, split, "single")
        cur = a["seq_cat"][:, -1, 0]
        risky = (cur >= 1) & (cur <= 5)
        hist = ((a["seq_cat"][:, :-1, 0] >= 1) & (a["seq_cat"][:, :-1, 0] <= 5)).sum(1)
        x = np.column_stack([risky, a["seq_num"][:, -1, 0], a["num"][:, 0], hist])
        return x, a["y"]

    x, y = features("train")
    xv, yv = features("vali")
    auc = roc_auc_score(yv, LogisticRegression().fit(x, y).predict_proba(xv)[:, 1])
    assert auc > 0.85


def test_no_signal_option(tmp_path):
    main(["--kind", "single", "--out", str(tmp_path), "--rows", "2000", "--signal", "0"])
    a = _arrays(tmp_path, "train", "single")
    assert abs(roc_auc_score(a["y"], a["seq_num"][:, -1, 0])) < 0.56


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--n-embedding", "8"]) == 2
    assert "n_embedding" in capsys.readouterr().err


def test_channels_layout(tmp_path, capsys):
    assert main(["--kind", "single", "--out", str(tmp_path), "--rows", "64", "--eval-rows", "64", "--layout",
                 "channels"]) == 0
    assert "channels" in capsys.readouterr().out
    for split in ("train", "vali", "cali"):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == sorted(
            p.name for p in layout_files(tmp_path, split, layout="channels").values())
    assert json.loads((tmp_path / "meta.json").read_text())["layout"] == "channels"
    dm = TSADataModule(str(tmp_path), batch_size=32)
    dm.setup("fit")
    assert sum(len(b["y"]) for b in dm.train_dataloader()) == 64
