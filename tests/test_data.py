"""TSADataModule: the legacy numpy layout, its validation errors, batches, and the training order."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lightning_port.data import (
    DataError,
    DataFileMissing,
    ResumableDataLoader,
    SeededEpochSampler,
    TSADataModule,
    detect_layout,
    layout_files,
    load_split,
)
from lightning_port.synth import SynthConfig, write_dataset

ROWS = 96


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    write_dataset(d, SynthConfig(kind="single", rows=ROWS, eval_rows=64, seed=1))
    return d


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dual")
    write_dataset(d, SynthConfig(kind="dual", rows=ROWS, eval_rows=64, seed=2))
    return d


@pytest.fixture
def broken(tmp_path, single_dir):
    """A writable copy of the single layout; returns (dir, files of the train split)."""
    for f in single_dir.glob("*.npy"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path, layout_files(tmp_path, "train", "single")


def _modify(path, fn):
    arr = np.load(path)
    arr = fn(arr)
    np.save(path, arr)


def _error(data_dir, kind="single", **kw) -> str:
    dm = TSADataModule(str(data_dir), kind=kind, batch_size=16, **kw)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    return msg


# ---- validation errors: each names the file and what was expected ------------------------------
def test_missing_file_names_it(broken):
    d, files = broken
    files["num"].unlink()
    msg = _error(d)
    assert str(files["num"]) in msg
    assert "missing" in msg
    assert "(N, n_eng)" in msg


def test_row_count_mismatch_names_file(broken):
    d, files = broken
    _modify(files["y"], lambda a: a[:-3])
    msg = _error(d)
    assert str(files["y"]) in msg
    assert f"expected {ROWS}" in msg


def test_shape_mismatch_names_file(broken):
    d, files = broken
    _modify(files["seq_num"], lambda a: a[:, :-1])  # sequence length 7 vs 8
    msg = _error(d)
    assert str(files["seq_num"]) in msg
    assert "expected 8" in msg


def test_cross_split_feature_count_mismatch(broken):
    d, _ = broken
    vali = layout_files(d, "vali", "single")
    _modify(vali["seq_cat"], lambda a: a[:, :, :-1])
    msg = _error(d)
    assert str(vali["seq_cat"]) in msg
    assert "expected 6" in msg
    assert "train" in msg


def test_model_feature_count_mismatch(single_dir):
    msg = _error(single_dir, n_cat_features=7)
    assert "train_X_seq_cat_v0.npy" in msg
    assert "expected 7" in msg
    assert "model" in msg


@pytest.mark.parametrize("key", ["seq_num", "num"])
def test_nan_names_file(broken, key):
    d, files = broken

    def put_nan(a):
        a = a.copy()
        a[5].flat[0] = np.nan
        return a

    _modify(files[key], put_nan)
    msg = _error(d)
    assert str(files[key]) in msg
    assert "NaN/inf" in msg
    assert "row 5" in msg


def test_code_out_of_range_names_file(broken):
    d, files = broken

    def bad_code(a):
        a = a.copy()
        a[7, -1, 2] = 36  # n_embedding 40 - n_num 5 = 35 is the largest code
        return a

    _modify(files["seq_cat"], bad_code)
    msg = _error(d, n_embedding=40, n_num_features=5)
    assert str(files["seq_cat"]) in msg
    assert "0..35" in msg
    assert "row 7" in msg
    TSADataModule(str(d), batch_size=8).setup("fit")  # unchecked without n_embedding


def test_not_padded_must_be_binary(broken):
    d, files = broken

    def bad_mask(a):
        a = a.copy()
        a[3, 0, -1] = 0.5
        return a

    _modify(files["seq_num"], bad_mask)
    msg = _error(d)
    assert str(files["seq_num"]) in msg
    assert "not_padded" in msg
    assert "0 or 1" in msg


def test_label_shape_n1_accepted_and_bad_shape_rejected(broken):
    d, files = broken
    _modify(files["y"], lambda a: a.reshape(-1, 1).astype(np.float32))
    dm = TSADataModule(str(d), batch_size=8)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["y"].dtype == torch.int64
    _modify(files["y"], lambda a: np.repeat(a, 2, axis=1))
    assert str(files["y"]) in _error(d)


def test_dual_ccid_shape_mismatch(tmp_path, dual_dir):
    for f in dual_dir.glob("*.npy"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    files = layout_files(tmp_path, "train", "dual")
    _modify(files["seq_cat_ccid"], lambda a: a[:, :, :-1])
    msg = _error(tmp_path, kind="dual")
    assert str(files["seq_cat_ccid"]) in msg


def test_time_overflow_warns(broken):
    d, files = broken

    def far(a):
        a = a.copy()
        a[0, 0, -2] = 1e8
        return a

    _modify(files["seq_num"], far)
    with pytest.warns(UserWarning, match=re.escape(str(files["seq_num"])) + ".*overflows"):
        TSADataModule(str(d), batch_size=8).setup("fit")


# ---- batches -----------------------------------------------------------------------------------
def test_single_batch_contract(single_dir):
    dm = TSADataModule(str(single_dir), kind="single", batch_size=16)
    dm.setup("fit")
    dm.setup("fit")  # safe twice
    b = next(iter(dm.val_dataloader()))
    assert b["x_seq_cat"].shape == (16, 8, 6)
    assert b["x_seq_cat"].dtype == torch.float32
    assert b["x_seq_num"].shape == (16, 8, 5)
    assert b["time_to_last"].shape == (16, 8, 1)
    assert b["not_padded"].shape == (16, 8)
    assert b["x_engineered_num"].shape == (16, 3)
    assert b["y"].shape == (16,)
    assert b["y"].dtype == torch.int64
    raw = np.load(layout_files(single_dir, "vali")["seq_num"])
    np.testing.assert_array_equal(b["x_seq_num"].numpy(), raw[:16, :, :-2])
    np.testing.assert_array_equal(b["time_to_last"][..., 0].numpy(), raw[:16, :, -2])
    np.testing.assert_array_equal(b["not_padded"].numpy(), raw[:16, :, -1])
    assert b["row_index"].tolist() == list(range(16))  # vali unshuffled


def test_dual_batch_contract_and_zero_engineered(tmp_path):
    write_dataset(tmp_path, SynthConfig(kind="dual", rows=40, eval_rows=40, n_eng=0, seed=3))
    dm = TSADataModule(str(tmp_path), kind="dual", batch_size=8, n_embedding=40)
    dm.setup("predict")
    b = next(iter(dm.predict_dataloader()))
    for sfx in ("_cid", "_ccid"):
        assert b[f"x_seq_cat{sfx}"].shape == (8, 8, 6)
        assert b[f"x_seq_num{sfx}"].shape == (8, 8, 5)
        assert b[f"time_to_last{sfx}"].shape == (8, 8, 1)
        assert b[f"not_padded{sfx}"].shape == (8, 8)
    assert b["x_engineered_num"].shape == (8, 0)


def test_getitems_matches_getitem(single_dir):
    dm = TSADataModule(str(single_dir), batch_size=4)
    ds = dm._dataset("train")
    idx = [9, 2, 40, 2]
    batch = ds.__getitems__(idx)
    for i, j in enumerate(idx):
        row = ds[j]
        for k in batch:
            torch.testing.assert_close(batch[k][i], row[k])


# ---- training order ----------------------------------------------------------------------------
def _order(dm, epoch):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([b["row_index"] for b in loader]).tolist()


def test_train_order_seeded_epoch_dependent(single_dir):
    a = TSADataModule(str(single_dir), batch_size=16, seed=5)
    b = TSADataModule(str(single_dir), batch_size=16, seed=5)
    assert _order(a, 0) == _order(b, 0)
    assert _order(a, 0) != _order(a, 1)
    assert sorted(_order(a, 1)) == list(range(ROWS))
    assert _order(a, 0) != _order(TSADataModule(str(single_dir), batch_size=16, seed=6), 0)


def test_distributed_shares_partition_the_permutation(single_dir):
    dm = TSADataModule(str(single_dir), batch_size=16, seed=0)
    ds = dm._dataset("train")
    shares = [list(SeededEpochSampler(ds, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(ROWS))


def test_resumable_loader_skips_consumed_batches(single_dir):
    dm = TSADataModule(str(single_dir), batch_size=16, seed=0)
    full = _order(dm, 2)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    loader.load_state_dict({"epoch": 2, "batches_done": 3, "seed": 0, "batch_size": 16, "num_replicas": 1})
    rest = torch.cat([b["row_index"] for b in loader]).tolist()
    assert rest == full[3 * 16 :]
    # the skip applies once: the next pass of the same epoch is whole again
    assert torch.cat([b["row_index"] for b in loader]).tolist() == full
    # a checkpoint taken at the end of an epoch resumes at the start of the next one
    loader.load_state_dict({"epoch": 2, "batches_done": len(loader), "seed": 0, "batch_size": 16, "num_replicas": 1})
    assert loader.sampler.epoch == 3


def test_load_split_shapes_only(single_dir):
    split = load_split(single_dir, "cali", validate=False)
    assert len(split) == 64
    assert split.dims.n_eng == 3


# ---- SageMaker channel folders (legacy-tsa §13) ----------------------------------------------------------
def _as_channels(src, dst, kind="single"):
    for split in ("train", "vali", "cali"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        for key, path in layout_files(src, split, kind).items():
            (dst / split / path.name).write_bytes(path.read_bytes())
            assert layout_files(dst, split, kind, layout="channels")[key] == dst / split / path.name


def test_channel_layout_is_detected_and_reads_the_same_rows(tmp_path, single_dir):
    _as_channels(single_dir, tmp_path)
    assert detect_layout(tmp_path, "vali") == "channels" and detect_layout(single_dir, "vali") == "flat"
    a, b = TSADataModule(str(tmp_path), batch_size=64), TSADataModule(str(single_dir), batch_size=64)
    a.setup("validate")
    b.setup("validate")
    for k, v in next(iter(a.val_dataloader())).items():
        torch.testing.assert_close(v, next(iter(b.val_dataloader()))[k])


def test_layout_errors_name_the_paths_looked_for(tmp_path, single_dir):
    with pytest.raises(DataFileMissing) as info:
        detect_layout(tmp_path / "nope", "train")
    msg = str(info.value)
    assert f"{tmp_path}/nope/train_X_seq_cat_v0.npy (flat layout)" in msg
    assert f"{tmp_path}/nope/train/train_X_seq_cat_v0.npy (SageMaker channel folder)" in msg
    assert "does not exist" in msg and isinstance(info.value, FileNotFoundError)
    _as_channels(single_dir, tmp_path)
    for f in single_dir.glob("vali_*.npy"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="vali split is there twice"):
        detect_layout(tmp_path, "vali")


def test_int_codes_vector_labels_and_read_only_files(tmp_path, single_dir):
    _as_channels(single_dir, tmp_path)
    files = layout_files(tmp_path, "vali", layout="channels")
    _modify(files["seq_cat"], lambda a: a.astype(np.int16))
    _modify(files["y"], lambda a: a.reshape(-1).astype(np.int64))
    for p in (tmp_path / "vali").iterdir():
        p.chmod(0o444)  # the legacy opened its files "r+"; we only read
    dm = TSADataModule(str(tmp_path), batch_size=64, n_embedding=40, n_num_features=5)
    dm.setup("validate")
    b = next(iter(dm.val_dataloader()))
    assert b["x_seq_cat"].dtype == torch.float32 and b["y"].dtype == torch.int64
    raw = np.load(layout_files(single_dir, "vali")["seq_cat"])
    np.testing.assert_array_equal(b["x_seq_cat"].numpy(), raw[:64])
