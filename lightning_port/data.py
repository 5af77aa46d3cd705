"""LightningDataModule for the legacy TSA numpy layout (legacy-tsa.md §13).

Per split (``train``, ``vali``, ``cali``) and version tag ``v`` (default ``v0``), in one of two
layouts, detected per split by :func:`detect_layout` (the ONE place that decides):

``flat``
    every file in ``DATA/``: ``DATA/vali_X_seq_cat_v0.npy``;
``channels``
    SageMaker input channels, one folder per split, as the legacy ``train.py`` read them
    (``train_data_folder = f"{data_dir}/train/train"``): ``DATA/vali/vali_X_seq_cat_v0.npy``.

Files per split:

single
    ``{split}_X_seq_cat_{v}.npy``  (N, L, n_cat)      categorical codes (stored as float or int)
    ``{split}_X_seq_num_{v}.npy``  (N, L, n_num + 2)  numerical features, then ``time_to_last``,
                                                      then ``not_padded`` (the last two columns)
    ``{split}_X_num_{v}.npy``      (N, n_eng)         engineered features of the current transaction
    ``{split}_Y_{v}.npy``          (N,) or (N, 1)     labels
dual
    ``{split}_cid_X_seq_cat_{v}.npy``, ``{split}_cid_X_seq_num_{v}.npy`` (customer sequence),
    ``{split}_ccid_X_seq_cat_{v}.npy``, ``{split}_ccid_X_seq_num_{v}.npy`` (card sequence),
    plus the shared ``_X_num_`` and ``_Y_`` files.

Histories are left-padded: the current transaction is the last position.

Stages: ``fit`` reads train + vali, ``validate`` and ``test`` read vali (the legacy "validation"
set that ``score_file.csv`` scores), ``predict`` reads cali (calibration). Files are memory-mapped;
a batch is read with one fancy-index per file (``Dataset.__getitems__``), not row by row.

Batches are dicts of tensors, the LightningModules' contract:
``x_seq_cat`` (B, L, n_cat) f32, ``x_seq_num`` (B, L, n_num) f32, ``time_to_last`` (B, L, 1) f32,
``not_padded`` (B, L) f32 — dual: the same four keys suffixed ``_cid`` and ``_ccid`` —
``x_engineered_num`` (B, n_eng) f32 (present even when n_eng == 0), ``y`` (B,) int64, and
``row_index`` (B,) int64, the row in the split (used to put scores back in file order under DDP).

Training order is a permutation drawn from ``seed + epoch`` (``DistributedSampler`` semantics, so
every rank draws the same permutation and takes its own share); the training dataloader is
resumable: its ``state_dict`` records the epoch and the number of batches the training loop has
consumed, and a ``fit`` resumed from a mid-epoch checkpoint continues with the remaining batches of
the same permutation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

__all__ = [
    "LAYOUTS",
    "SPLITS",
    "DataError",
    "DataFileMissing",
    "ResumableDataLoader",
    "SeededEpochSampler",
    "TSADataModule",
    "TSANumpyDataset",
    "collate_tsa",
    "detect_layout",
    "layout_files",
    "split_files",
    "load_split",
]

SPLITS = ("train", "vali", "cali")
LAYOUTS = ("flat", "channels")
Kind = Literal["single", "dual"]


class DataError(ValueError):
    """A user's data mistake: one line naming the file and what was expected."""


class DataFileMissing(DataError, FileNotFoundError):
    """A file (or the whole split) of the legacy layout is not there; the message names the paths looked for."""

# Legacy temporal attention computes exp(time difference / 1e6) in float32: it overflows above ~8.8e7.
TIME_OVERFLOW = 8.8e7
# Rows scanned per chunk during validation (bounded memory on large memory-mapped files).
_SCAN_BYTES = 1 << 26


def _seq_prefixes(kind: str) -> tuple[str, ...]:
    """File-name infixes of the sequence files: ``""`` (single) or ``"_cid"``, ``"_ccid"`` (dual)."""
    if kind == "single":
        return ("",)
    if kind == "dual":
        return ("_cid", "_ccid")
    raise ValueError(f"kind must be 'single' or 'dual', got {kind!r}")


def layout_files(
    data_dir: str | Path, split: str, kind: str = "single", version: str = "v0", layout: str = "flat"
) -> dict[str, Path]:
    """The file of each array of one split in ``layout`` (``flat``: ``DATA/{split}_...``; ``channels``:
    ``DATA/{split}/{split}_...``), keyed ``seq_cat{sfx}``, ``seq_num{sfx}``, ``num``, ``y`` with
    ``sfx`` = ``""`` (single) or ``"_cid"`` / ``"_ccid"`` (dual). Names only: nothing is checked."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    d = Path(data_dir) / split if layout == "channels" else Path(data_dir)
    files: dict[str, Path] = {}
    for sfx in _seq_prefixes(kind):
        files[f"seq_cat{sfx}"] = d / f"{split}{sfx}_X_seq_cat_{version}.npy"
        files[f"seq_num{sfx}"] = d / f"{split}{sfx}_X_seq_num_{version}.npy"
    files["num"] = d / f"{split}_X_num_{version}.npy"
    files["y"] = d / f"{split}_Y_{version}.npy"
    return files


def detect_layout(data_dir: str | Path, split: str, kind: str = "single", version: str = "v0") -> str:
    """``"flat"`` or ``"channels"``: the layout that holds this split's files.

    Refused in one line: no file of the split in either place (the message names both paths looked
    for), or files in both (which set is meant is then not clear).
    """
    d = Path(data_dir)
    found = {lay: [p for p in layout_files(d, split, kind, version, lay).values() if p.is_file()] for lay in LAYOUTS}
    if found["flat"] and found["channels"]:
        raise DataError(
            f"{d}: the {split} split is there twice, flat ({found['flat'][0]}) and as a SageMaker channel "
            f"folder ({found['channels'][0]}); keep one"
        )
    for lay in ("channels", "flat"):
        if found[lay]:
            return lay
    first = f"seq_cat{_seq_prefixes(kind)[0]}"
    flat, chan = layout_files(d, split, kind, version, "flat")[first], layout_files(d, split, kind, version, "channels")[first]
    where = "" if d.is_dir() else " (the folder does not exist)"
    raise DataFileMissing(
        f"{d}: no {split} data{where}: looked for {flat} (flat layout) and {chan} (SageMaker channel folder)"
    )


def split_files(data_dir: str | Path, split: str, kind: str = "single", version: str = "v0") -> tuple[str, dict[str, Path]]:
    """``(layout, files)`` of one split, the layout detected by :func:`detect_layout`."""
    layout = detect_layout(data_dir, split, kind, version)
    return layout, layout_files(data_dir, split, kind, version, layout)


@dataclass(frozen=True)
class SplitDims:
    """Feature counts of one split; every split (and the model) must agree on them."""

    n_cat: int
    n_num: int  # without time_to_last / not_padded
    seq_len: int
    n_eng: int


@dataclass
class LoadedSplit:
    name: str
    files: dict[str, Path]
    arrays: dict[str, np.ndarray]
    dims: SplitDims
    layout: str = "flat"

    def __len__(self) -> int:
        return int(self.arrays["y"].shape[0])


def _open(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataFileMissing(f"{path}: missing; expected {what}")
    try:
        # read-only map: the legacy opened its files mmap_mode="r+", we never need to write
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays, corrupt headers, truncated files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a plain numeric .npy array ({msg}); expected {what}") from None
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{path}: holds {getattr(arr, 'dtype', type(arr).__name__)} values; expected {what} as numbers")
    return arr


def _chunks(n: int, row_bytes: int) -> Iterator[slice]:
    step = max(1, _SCAN_BYTES // max(1, row_bytes))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _first_bad(mask: np.ndarray) -> tuple[int, int]:
    """(first row with a True, number of True entries)."""
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return int(rows[0]), int(mask.sum())


def _check_finite(path: Path, arr: np.ndarray, what: str) -> None:
    if not np.issubdtype(arr.dtype, np.floating):
        return
    row_bytes = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    for sl in _chunks(arr.shape[0], row_bytes):
        bad = ~np.isfinite(arr[sl])
        if bad.any():
            row, count = _first_bad(bad)
            raise DataError(
                f"{path}: {count} NaN/inf value(s) in {what}, first at row {sl.start + row}; expected finite values"
            )


def _check_codes(path: Path, arr: np.ndarray, hi: int | None) -> None:
    """Categorical codes must be integers in 0..hi (0 = padding, legacy-tsa §1)."""
    row_bytes = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    for sl in _chunks(arr.shape[0], row_bytes):
        block = np.asarray(arr[sl])
        if np.issubdtype(block.dtype, np.floating):
            bad = block != np.round(block)
            if bad.any():
                row, count = _first_bad(bad)
                raise DataError(
                    f"{path}: {count} non-integer categorical code(s), first at row {sl.start + row}; "
                    "expected integer codes"
                )
        low = block < 0
        if hi is not None:
            low = low | (block > hi)
        if low.any():
            row, count = _first_bad(low)
            value = block.reshape(block.shape[0], -1)[row][low.reshape(low.shape[0], -1)[row]][0]
            rng = f"0..{hi} (n_embedding - n_num_features)" if hi is not None else ">= 0"
            raise DataError(
                f"{path}: {count} categorical code(s) outside {rng}, first {value:g} at row {sl.start + row}"
            )


def _check_seq_num(path: Path, arr: np.ndarray) -> None:
    """Finite values; ``not_padded`` (last column) 0/1; warn when time gaps reach the overflow zone."""
    row_bytes = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    t_max = 0.0
    for sl in _chunks(arr.shape[0], row_bytes):
        block = np.asarray(arr[sl])
        bad = ~np.isfinite(block)
        if bad.any():
            row, count = _first_bad(bad)
            raise DataError(
                f"{path}: {count} NaN/inf value(s), first at row {sl.start + row}; expected finite values"
            )
        mask = block[..., -1]
        bad = (mask != 0) & (mask != 1)
        if bad.any():
            row, count = _first_bad(bad)
            raise DataError(
                f"{path}: not_padded (last column) has {count} value(s) other than 0/1, first at row "
                f"{sl.start + row}; expected 0 or 1"
            )
        if block.shape[0]:
            t_max = max(t_max, float(np.abs(block[..., -2]).max()))
    if t_max > TIME_OVERFLOW:
        warnings.warn(
            f"{path}: time_to_last reaches {t_max:.3g}; the legacy temporal attention overflows above "
            f"~{TIME_OVERFLOW:.1e} (exp(dt / 1e6) in float32)",
            stacklevel=3,
        )


def load_split(
    data_dir: str | Path,
    split: str,
    kind: str = "single",
    version: str = "v0",
    *,
    n_embedding: int | None = None,
    n_num_features: int | None = None,
    expected: Sequence[tuple[SplitDims, str]] = (),
    validate: bool = True,
) -> LoadedSplit:
    """Memory-map one split (flat or channel layout, detected) and check it; every error is a
    :class:`DataError` (one line naming the file; :class:`DataFileMissing` for absent files).

    ``expected`` holds ``(feature counts, where they come from)`` pairs (another split, the model),
    compared with this split's; ``None`` fields are not checked. ``n_embedding`` and ``n_num_features`` bound the
    categorical codes to ``0..n_embedding - n_num_features``. ``validate=False`` checks names and
    shapes only (no scan of the values).
    """
    layout, files = split_files(data_dir, split, kind, version)
    arrays: dict[str, np.ndarray] = {}
    prefixes = _seq_prefixes(kind)
    for sfx in prefixes:
        seq = f" {sfx[1:]}" if sfx else ""
        arrays[f"seq_cat{sfx}"] = _open(
            files[f"seq_cat{sfx}"], f"the {split}{seq} categorical sequences, shape (N, L, n_cat)"
        )
        arrays[f"seq_num{sfx}"] = _open(
            files[f"seq_num{sfx}"],
            f"the {split}{seq} numerical sequences, shape (N, L, n_num + 2) ending with time_to_last, not_padded",
        )
    arrays["num"] = _open(files["num"], f"the {split} engineered features, shape (N, n_eng)")
    arrays["y"] = _open(files["y"], f"the {split} labels, shape (N,) or (N, 1)")

    # ---- shapes ---------------------------------------------------------------------------------
    ref_key = f"seq_cat{prefixes[0]}"
    n = arrays[ref_key].shape[0] if arrays[ref_key].ndim else 0
    for key, arr in arrays.items():
        path = files[key]
        if key.startswith("seq_cat") and arr.ndim != 3:
            raise DataError(f"{path}: shape {arr.shape}; expected 3 axes (N, L, n_cat)")
        if key.startswith("seq_num") and (arr.ndim != 3 or arr.shape[-1] < 2):
            raise DataError(
                f"{path}: shape {arr.shape}; expected (N, L, n_num + 2) with time_to_last, not_padded last"
            )
        if key == "num" and arr.ndim != 2:
            raise DataError(f"{path}: shape {arr.shape}; expected (N, n_eng) (use (N, 0) for no engineered features)")
        if key == "y" and not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1)):
            raise DataError(f"{path}: shape {arr.shape}; expected (N,) or (N, 1)")
        if arr.shape[0] != n:
            raise DataError(f"{path}: {arr.shape[0]} rows; expected {n}, the rows of {files[ref_key].name}")
    for sfx in prefixes:
        cat, num = arrays[f"seq_cat{sfx}"], arrays[f"seq_num{sfx}"]
        if num.shape[1] != cat.shape[1]:
            raise DataError(
                f"{files[f'seq_num{sfx}']}: sequence length {num.shape[1]}; expected {cat.shape[1]}, "
                f"the length in {files[f'seq_cat{sfx}'].name}"
            )
    cat0, num0 = arrays[ref_key], arrays[f"seq_num{prefixes[0]}"]
    dims = SplitDims(
        n_cat=int(cat0.shape[2]), n_num=int(num0.shape[2]) - 2, seq_len=int(cat0.shape[1]), n_eng=int(arrays["num"].shape[1])
    )
    if kind == "dual":  # both sequences feed order stacks of the same width and the same table
        cat1, num1 = arrays["seq_cat_ccid"], arrays["seq_num_ccid"]
        if cat1.shape[1:] != cat0.shape[1:]:
            raise DataError(
                f"{files['seq_cat_ccid']}: shape {cat1.shape}; expected (N, {dims.seq_len}, {dims.n_cat}) like "
                f"{files['seq_cat_cid'].name}"
            )
        if num1.shape[1:] != num0.shape[1:]:
            raise DataError(
                f"{files['seq_num_ccid']}: shape {num1.shape}; expected (N, {dims.seq_len}, {dims.n_num + 2}) like "
                f"{files['seq_num_cid'].name}"
            )
    labels = {
        "n_cat": ("categorical features", ref_key),
        "n_num": ("numerical features (besides time_to_last, not_padded)", f"seq_num{prefixes[0]}"),
        "seq_len": ("sequence length", ref_key),
        "n_eng": ("engineered features", "num"),
    }
    for want_dims, source in expected:
        for field, (label, key) in labels.items():
            got, want = getattr(dims, field), getattr(want_dims, field)
            if want is not None and got != want:
                raise DataError(f"{files[key]}: {got} {label}; expected {want} ({source})")

    if validate:
        hi = None
        if n_embedding is not None:
            nn_ = dims.n_num if n_num_features is None else n_num_features
            hi = int(n_embedding) - int(nn_)
        for sfx in prefixes:
            _check_codes(files[f"seq_cat{sfx}"], arrays[f"seq_cat{sfx}"], hi)
            _check_seq_num(files[f"seq_num{sfx}"], arrays[f"seq_num{sfx}"])
        _check_finite(files["num"], arrays["num"], "the engineered features")
        y = arrays["y"]
        yv = np.asarray(y).reshape(-1)
        if np.issubdtype(yv.dtype, np.floating):
            _check_finite(files["y"], y, "the labels")
            if (yv != np.round(yv)).any():
                row = int(np.flatnonzero(yv != np.round(yv))[0])
                raise DataError(f"{files['y']}: non-integer label {yv[row]:g} at row {row}; expected class indices")
        if yv.size and yv.min() < 0:
            row = int(np.flatnonzero(yv < 0)[0])
            raise DataError(f"{files['y']}: negative label {yv[row]:g} at row {row}; expected class indices >= 0")
    return LoadedSplit(name=split, files=files, arrays=arrays, dims=dims, layout=layout)


class TSANumpyDataset(Dataset):
    """One split as a map-style dataset; ``__getitems__`` returns a whole batch dict."""

    def __init__(self, split: LoadedSplit, kind: str = "single") -> None:
        self.split = split
        self.kind = kind
        self._prefixes = _seq_prefixes(kind)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]  # ascending reads from the memory map
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))

        def take(key: str) -> np.ndarray:
            return np.asarray(self.split.arrays[key][sorted_idx])[inverse]

        out: dict[str, torch.Tensor] = {}
        for sfx in self._prefixes:
            cat = take(f"seq_cat{sfx}").astype(np.float32, copy=False)  # (B, L, n_cat)
            num = take(f"seq_num{sfx}").astype(np.float32, copy=False)  # (B, L, n_num + 2)
            out[f"x_seq_cat{sfx}"] = torch.from_numpy(np.ascontiguousarray(cat))
            out[f"x_seq_num{sfx}"] = torch.from_numpy(np.ascontiguousarray(num[..., :-2]))  # (B, L, n_num)
            out[f"time_to_last{sfx}"] = torch.from_numpy(np.ascontiguousarray(num[..., -2:-1]))  # (B, L, 1)
            out[f"not_padded{sfx}"] = torch.from_numpy(np.ascontiguousarray(num[..., -1]))  # (B, L)
        out["x_engineered_num"] = torch.from_numpy(np.ascontiguousarray(take("num").astype(np.float32, copy=False)))
        out["y"] = torch.from_numpy(take("y").reshape(-1).astype(np.int64))
        out["row_index"] = torch.from_numpy(idx.copy())
        return out


def collate_tsa(data: Any) -> dict[str, torch.Tensor]:
    """Batches from ``__getitems__`` are already dicts; lists of samples fall back to ``default_collate``."""
    if isinstance(data, dict):
        return data
    return default_collate(data)


class SeededEpochSampler(DistributedSampler):
    """``DistributedSampler`` (permutation from ``seed + epoch``) that can skip the samples of batches
    already trained when a fit resumes mid-epoch. One replica = a plain seeded shuffle."""

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._skip = 0
        self._skip_epoch: int | None = None

    def skip_first(self, n_samples: int, epoch: int) -> None:
        """Drop the first ``n_samples`` of this rank's share the next time ``epoch`` is iterated."""
        self._skip, self._skip_epoch = int(n_samples), int(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip and self._skip_epoch == self.epoch:
            indices = indices[self._skip :]
        self._skip, self._skip_epoch = 0, None
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """Training ``DataLoader`` with Lightning's ``state_dict`` / ``load_state_dict`` protocol.

    The state is the sampler's epoch and the number of batches the training loop has consumed
    (``progress_fn``, read from the trainer at save time: the loader's own count would include the
    batches Lightning prefetches).
    """

    progress_fn: Callable[[], int] | None = None

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "epoch": int(getattr(sampler, "epoch", 0)),
            "batches_done": int(self.progress_fn()) if self.progress_fn is not None else 0,
            "seed": int(getattr(sampler, "seed", 0)),
            "batch_size": self.batch_size,
            "num_replicas": int(getattr(sampler, "num_replicas", 1)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, SeededEpochSampler):
            return
        if (state.get("seed"), state.get("batch_size"), state.get("num_replicas")) != (
            sampler.seed,
            self.batch_size,
            sampler.num_replicas,
        ):
            warnings.warn(
                "resuming with a different data seed, batch size or world size than the checkpoint: the "
                "training order of the resumed epoch is not the interrupted one",
                stacklevel=2,
            )
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self):  # saved at the end of an epoch: the next one starts fresh
            epoch, done = epoch + 1, 0
        # Lightning draws the first batch of a resumed fit before calling set_epoch: set it here.
        sampler.set_epoch(epoch)
        sampler.skip_first(done * int(self.batch_size or 1), epoch)


class TSADataModule(pl.LightningDataModule):
    """Legacy numpy layout (single or dual) as a LightningDataModule.

    Args:
        data_dir: directory with the ``{split}_..._{version}.npy`` files, flat or in SageMaker channel
            folders ``data_dir/{split}/`` (detected per split).
        kind: ``single`` or ``dual``; ``None`` lets the CLI pick it from the model class.
        version: version tag in the file names.
        batch_size: rows per batch and per process (DDP: the global batch is ``batch_size * world_size``).
        eval_batch_size: rows per batch for vali / cali (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of the training order (epoch ``e`` uses the permutation of ``seed + e``).
        n_embedding, n_num_features: when given (the CLI passes the model's), categorical codes
            are checked to lie in ``0..n_embedding - n_num_features``.
        n_cat_features, seq_len, n_engineered_num_features: when given, the files must have them.
        validate: scan values at setup (NaN/inf, codes, padding mask); shapes are always checked.
        pin_memory: pin host memory (useful with CUDA).
    """

    def __init__(
        self,
        data_dir: str,
        kind: Kind | None = "single",
        version: str = "v0",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        n_embedding: int | None = None,
        n_num_features: int | None = None,
        n_cat_features: int | None = None,
        seq_len: int | None = None,
        n_engineered_num_features: int | None = None,
        validate: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if kind is not None and kind not in ("single", "dual"):
            raise ValueError(f"kind must be 'single' or 'dual', got {kind!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data_dir = data_dir
        self.kind = kind
        self.version = version
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.n_embedding = n_embedding
        self.n_num_features = n_num_features
        self.n_cat_features = n_cat_features
        self.seq_len = seq_len
        self.n_engineered_num_features = n_engineered_num_features
        self.validate = validate
        self.pin_memory = pin_memory
        self.splits: dict[str, LoadedSplit] = {}
        self._dims: SplitDims | None = None
        self._dims_from = ""

    # ---- model agreement ------------------------------------------------------------------------
    def configure_from_model(self, hparams: dict[str, Any]) -> None:
        """Take the model's feature counts (legacy hyperparameter names) for validation; values
        already given to the datamodule win."""
        for name in ("n_embedding", "n_num_features", "n_cat_features", "seq_len", "n_engineered_num_features"):
            if getattr(self, name) is None and hparams.get(name) is not None:
                setattr(self, name, int(hparams[name]))

    def _model_dims(self) -> SplitDims | None:
        if all(
            v is None for v in (self.n_cat_features, self.n_num_features, self.seq_len, self.n_engineered_num_features)
        ):
            return None
        return SplitDims(
            n_cat=self.n_cat_features, n_num=self.n_num_features, seq_len=self.seq_len, n_eng=self.n_engineered_num_features
        )  # type: ignore[arg-type]

    # ---- loading --------------------------------------------------------------------------------
    def _load(self, split: str) -> LoadedSplit:
        if split in self.splits:
            return self.splits[split]
        if self.kind is None:
            raise ValueError("TSADataModule.kind is unset: pass kind='single' or 'dual'")
        expected: list[tuple[SplitDims, str]] = []
        if self._model_dims() is not None:
            expected.append((self._model_dims(), "from the model's hyperparameters"))  # type: ignore[arg-type]
        if self._dims is not None:
            expected.append((self._dims, f"as in the {self._dims_from} split"))
        loaded = load_split(
            self.data_dir,
            split,
            self.kind,
            self.version,
            n_embedding=self.n_embedding,
            n_num_features=self.n_num_features,
            expected=expected,
            validate=self.validate,
        )
        if self._dims is None:
            self._dims, self._dims_from = loaded.dims, split
        self.splits[split] = loaded
        return loaded

    @property
    def dims(self) -> SplitDims:
        """Feature counts read from the files (loads the training split's headers if needed)."""
        if self._dims is None:
            first = "train"
            for s in SPLITS:
                try:
                    detect_layout(self.data_dir, s, self.kind or "single", self.version)
                except DataError:
                    continue
                first = s
                break
            self._load(first)
        assert self._dims is not None
        return self._dims

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": ("train", "vali"),
            "validate": ("vali",),
            "test": ("vali",),
            "predict": ("cali",),
            None: SPLITS,
        }
        if stage not in wanted:
            raise ValueError(f"unknown stage {stage!r}")
        for split in wanted[stage]:
            self._load(split)

    # ---- loaders --------------------------------------------------------------------------------
    def _dataset(self, split: str) -> TSANumpyDataset:
        return TSANumpyDataset(self._load(split), self.kind or "single")

    def _batches_done(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = SeededEpochSampler(ds, num_replicas=world, rank=rank, seed=self.seed, shuffle=True)
        loader = ResumableDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_tsa,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        loader.progress_fn = self._batches_done
        return loader

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_tsa,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("vali")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("vali")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("cali")

    def num_training_batches(self) -> int:
        return math.ceil(len(self._load("train")) / self.batch_size)
