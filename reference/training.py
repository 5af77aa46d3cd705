"""Legacy training semantics (`train.py`, `utilities.py`, `datasets.py`) as a small library.

This is the "legacy side" the parity suite drives: `set_loss`, the Adam + OneCycleLR factory
(stepped once per epoch), the key-padding-mask builder, one training epoch and one evaluation
pass (single process), the legacy AUC, the score/tag file writers, the 1000-row percentile
table, a reader for the legacy numpy layout, the legacy `EarlyStopping` and the whole `train.py`
loop with its selection rules (`legacy_fit`) (legacy-tsa.md sections 12-13).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from .losses import ASLSingleLabel, Cyclical_FocalLoss, FocalLoss

SPLITS = ("train", "vali", "cali")
N_PERCENTILES = 1000

# --------------------------------------------------------------------------- losses, optimiser


def set_loss(loss, gamma=2.0, alpha=0.25, reduction="mean", max_epoch=70):
    """Legacy `set_loss`: the loss object for a `--loss` name."""
    if loss == "CrossEntropyLoss":
        return nn.CrossEntropyLoss(reduction="sum")  # legacy: "sum", not torch's default "mean"
    if loss == "FocalLoss":
        return FocalLoss(gamma=gamma, alpha=alpha, reduction=reduction)
    if loss == "Cyclical_FocalLoss":
        return Cyclical_FocalLoss(gamma_pos=0, gamma_neg=4, gamma_hc=0, reduction="sum", epochs=max_epoch)
    if loss == "ASLSingleLabel":
        return ASLSingleLabel(gamma_pos=0, gamma_neg=4)
    if loss == "BCEWithLogitsLoss":
        return nn.BCEWithLogitsLoss(reduction="sum")  # legacy bug: cannot take 2-class logits with integer targets
    raise ValueError(f"unknown loss {loss!r}")


def make_optimizer(model, lr=1e-5, scheduler_maxlr=1e-3, max_epoch=70, betas=(0.9, 0.999), weight_decay=0.0):
    """Legacy optimiser: Adam + OneCycleLR(max_lr, total_steps=max_epoch), the scheduler stepped once per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=scheduler_maxlr, total_steps=max_epoch)
    return optimizer, scheduler


def compute_loss(loss_fn, scores, y, epoch=None):
    if isinstance(loss_fn, Cyclical_FocalLoss):
        return loss_fn(scores, y, epoch)
    return loss_fn(scores, y)


# --------------------------------------------------------------------------- batches


def key_padding_mask(not_padded: torch.Tensor) -> torch.Tensor:
    """(B, L) float not_padded -> (B, L+1) bool, True = ignore; the appended dummy slot is never masked."""
    return torch.logical_not(F.pad(not_padded, (0, 1), value=True))


def model_inputs(batch: Mapping[str, torch.Tensor], kind: str):
    """Legacy dataset batch dict -> (args, kwargs) for the legacy model's forward."""
    if kind == "single":
        args = (batch["x_seq_cat"], batch["x_seq_num"], batch.get("x_engineered_num"), batch["time_to_last"])
        return args, {"key_padding_mask": key_padding_mask(batch["not_padded"])}
    if kind == "dual":
        args = (
            batch["x_seq_cat_cid"],
            batch["x_seq_num_cid"],
            batch["time_to_last_cid"],
            batch["x_seq_cat_ccid"],
            batch["x_seq_num_ccid"],
            batch["time_to_last_ccid"],
            batch.get("x_engineered_num"),
        )
        kwargs = {
            "key_padding_mask_cid": key_padding_mask(batch["not_padded_cid"]),
            "key_padding_mask_ccid": key_padding_mask(batch["not_padded_ccid"]),
        }
        return args, kwargs
    raise ValueError(f"kind must be 'single' or 'dual', got {kind!r}")


# --------------------------------------------------------------------------- loops


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    epoch: int,
    kind: str = "single",
    scaler=None,
    before_step: Callable[[int], None] | None = None,
    step_offset: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> list[float]:
    """One legacy epoch: per batch zero_grad, forward, loss, backward, step; no clipping. Returns the losses.

    `before_step(global_step)` runs right before each forward pass (the parity suite reseeds there).
    With `scaler` (legacy `use_amp` 1) the forward and the loss run under `torch.autocast` and the
    backward / step go through the GradScaler. `amp_dtype` None is the legacy autocast: the device's
    default low precision (float16 on CUDA, where the legacy jobs ran; bfloat16 on CPU); the parity
    suite passes float16 to run the legacy CUDA recipe on CPU.
    """
    model.train()
    losses = []
    for i, batch in enumerate(batches):
        if before_step is not None:
            before_step(step_offset + i)
        optimizer.zero_grad()
        args, kwargs = model_inputs(batch, kind)
        if scaler is not None:
            with torch.autocast(device_type=batch["y"].device.type, dtype=amp_dtype):  # legacy: device default
                scores, _ = model(*args, **kwargs)
                loss = compute_loss(loss_fn, scores, batch["y"], epoch)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            scores, _ = model(*args, **kwargs)
            loss = compute_loss(loss_fn, scores, batch["y"], epoch)
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], kind: str = "single", loss_fn=None):
    """One legacy evaluation pass: (softmax[:, -1] scores, labels, summed loss or None)."""
    model.eval()
    scores_all, labels_all, total = [], [], 0.0
    for batch in batches:
        args, kwargs = model_inputs(batch, kind)
        scores, _ = model(*args, **kwargs)
        if loss_fn is not None:
            total += compute_loss(loss_fn, scores, batch["y"]).item()  # legacy: Cyclical_FocalLoss crashes here (no epoch)
        scores_all.append(torch.softmax(scores, dim=1)[:, -1].float().cpu())
        if "y" in batch:
            labels_all.append(batch["y"].cpu())
    probs = torch.cat(scores_all).numpy()
    labels = torch.cat(labels_all).numpy() if labels_all else None
    return probs, labels, (total if loss_fn is not None else None)


def legacy_auc(labels, scores) -> float:
    """Legacy validation metric: roc_auc_score(label, softmax(scores)[:, -1])."""
    return float(roc_auc_score(np.asarray(labels).reshape(-1), np.asarray(scores).reshape(-1)))


# --------------------------------------------------------------------------- score files


def write_score_file(path, scores) -> None:
    """One softmax[:, -1] value per line, no header."""
    arr = np.asarray(scores, dtype=np.float32).reshape(-1)
    Path(path).write_text("".join(str(v) + "\n" for v in arr))  # str(np.float32): shortest float32 repr


def write_tag_file(path, labels) -> None:
    """One integer label per line, no header."""
    arr = np.asarray(labels).reshape(-1)
    Path(path).write_text("".join(f"{int(v)}\n" for v in arr))


def percentile_table(cali_scores) -> list:
    """`[np.percentile(cali_scores, 100*k/1000), k/1000]` for k = 0..999 (the legacy table has no 100th percentile)."""
    arr = np.asarray(cali_scores, dtype=np.float32).reshape(-1)
    return [[np.percentile(arr, 100 * k / N_PERCENTILES), k / N_PERCENTILES] for k in range(N_PERCENTILES)]


def write_percentile_table(path, cali_scores) -> None:
    with open(path, "wb") as f:
        pickle.dump(percentile_table(cali_scores), f)


def write_score_files(out_dir, vali_scores, vali_labels, cali_scores, cali_labels) -> None:
    """The legacy post-training outputs: score/tag files for vali and cali, and percentile_score.pkl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_score_file(out / "score_file.csv", vali_scores)
    write_tag_file(out / "tag_file.csv", vali_labels)
    write_score_file(out / "cali_score_file.csv", cali_scores)
    write_tag_file(out / "cali_tag_file.csv", cali_labels)
    write_percentile_table(out / "percentile_score.pkl", cali_scores)


# --------------------------------------------------------------------------- numpy layout


def split_files(data_dir, split: str, version: str = "v0", kind: str = "single", layout: str = "channels") -> dict[str, Path]:
    """Legacy file names of one split.

    legacy: `train.py` reads SageMaker input channels, `train_data_folder = f"{data_dir}/train/train"`
    (and `vali/vali`, `cali/cali`), so the files are `{data_dir}/{split}/{split}_X_..._{version}.npy`
    (`layout="channels"`, the default). `layout="flat"` (`{data_dir}/{split}_X_...`) is the project's
    own flat folder, not a legacy layout.
    """
    if layout == "channels":
        prefix = f"{data_dir}/{split}/{split}"  # legacy: f"{data_dir}/vali/vali"
    elif layout == "flat":
        prefix = f"{data_dir}/{split}"
    else:
        raise ValueError(f"layout must be 'channels' or 'flat', got {layout!r}")
    files = {"x_num": Path(f"{prefix}_X_num_{version}.npy"), "y": Path(f"{prefix}_Y_{version}.npy")}
    if kind == "single":
        files["seq_cat"] = Path(f"{prefix}_X_seq_cat_{version}.npy")
        files["seq_num"] = Path(f"{prefix}_X_seq_num_{version}.npy")
    elif kind == "dual":
        for seq in ("cid", "ccid"):
            files[f"seq_cat_{seq}"] = Path(f"{prefix}_{seq}_X_seq_cat_{version}.npy")
            files[f"seq_num_{seq}"] = Path(f"{prefix}_{seq}_X_seq_num_{version}.npy")
    else:
        raise ValueError(f"kind must be 'single' or 'dual', got {kind!r}")
    return files


def load_split(
    data_dir, split: str, version: str = "v0", kind: str = "single", mmap: bool = True, layout: str = "channels",
    mmap_mode: str = "r+",
) -> dict[str, np.ndarray]:
    """Read one split of the legacy numpy layout into the legacy dataset's arrays (keys as in the batch dict).

    legacy: `np.load(path, mmap_mode="r+")` (the files must be writable); tools that only read pass
    `mmap_mode="r"`.
    """
    files = split_files(data_dir, split, version, kind, layout)
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing file of the legacy numpy layout (split {split!r})")
    load = (lambda p: np.load(p, mmap_mode=mmap_mode)) if mmap else np.load
    out = {"x_engineered_num": load(files["x_num"]), "y": np.asarray(load(files["y"])).reshape(-1)}
    suffixes = [""] if kind == "single" else ["_cid", "_ccid"]
    for sfx in suffixes:
        seq_num = load(files[f"seq_num{sfx}"])
        out[f"x_seq_cat{sfx}"] = load(files[f"seq_cat{sfx}"])
        out[f"x_seq_num{sfx}"] = seq_num[:, :, :-2]  # legacy: last two columns are time_to_last, not_padded
        out[f"time_to_last{sfx}"] = seq_num[:, :, -2:-1]
        out[f"not_padded{sfx}"] = seq_num[:, :, -1]
    return out


class LegacyDataset(torch.utils.data.Dataset):
    """Legacy `datasets.py`: one row of a split as a dict of float32 tensors (labels int64)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)
        self.n = len(self.arrays["y"])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = {}
        for k, a in self.arrays.items():
            v = torch.from_numpy(np.array(a[i]))
            item[k] = v.long() if k == "y" else v.float()
        return item


# --------------------------------------------------------------------------- the legacy train.py loop


class EarlyStopping:
    """Legacy `utilities.EarlyStopping` (the pytorchtools recipe), called by train.py as `early_stopping(-auc, model)`.

    Early stops the training if the validation loss doesn't improve after a given patience.
    """

    def __init__(self, patience=7, verbose=False, delta=0, path='checkpoint.pt', trace_func=print):
        self.patience = patience
        self.verbose = verbose
        self.counter = 0
        self.best_score = None
        self.early_stop = False
        self.val_loss_min = np.inf
        self.delta = delta
        self.path = path  # harness addition: None = do not write the file
        self.trace_func = trace_func

    def __call__(self, val_loss, model):
        score = -val_loss  # legacy: val_loss is -auc, so score is the rounded AUC
        if self.best_score is None:
            self.best_score = score
            self.save_checkpoint(val_loss, model)
        elif score < self.best_score + self.delta:  # legacy: only a strictly lower AUC counts (delta 0) ...
            self.counter += 1
            if self.verbose:
                self.trace_func(f'EarlyStopping counter: {self.counter} out of {self.patience}')
            if self.counter >= self.patience:
                self.early_stop = True
        else:  # ... a tie lands here: new best score, counter reset, checkpoint.pt overwritten with the later epoch
            self.best_score = score
            self.save_checkpoint(val_loss, model)
            self.counter = 0

    def save_checkpoint(self, val_loss, model):
        if self.verbose:
            self.trace_func(f'Validation loss decreased ({self.val_loss_min:.6f} --> {val_loss:.6f}).  Saving model ...')
        if self.path is not None:
            torch.save(model.state_dict(), self.path)  # legacy DDP: the wrapped model, keys prefixed `module.`
        self.val_loss_min = val_loss


@dataclass
class LegacyEpoch:
    """What the legacy loop saw in one epoch (train.py printed these)."""

    epoch: int
    lr: float  # the learning rate the epoch trained with
    train_losses: list  # per batch (CrossEntropyLoss is a sum over the batch)
    vali_loss: float  # summed over the validation batches
    auc_raw: float  # roc_auc_score before rounding (harness record; train.py kept only the rounded value)
    auc: float  # round(auc, 4): what both decisions use
    saved_best: bool
    es_counter: int
    early_stop: bool  # the flag after this epoch's early_stopping call
    vali_scores: np.ndarray | None = None  # softmax[:, -1] of this epoch's validation pass (harness record)


@dataclass
class LegacyRun:
    epochs: list  # LegacyEpoch per trained epoch
    best_auc: float
    best_epoch: int | None  # epoch of the weights in {test_name}.pt (None: never saved)
    flag_epoch: int | None  # epoch after whose validation early_stopping.early_stop became True
    early_stopped: bool  # the flag was read at the top of a next epoch: best reloaded, scored, files written
    vali_scores: np.ndarray | None = None
    vali_labels: np.ndarray | None = None
    cali_scores: np.ndarray | None = None
    cali_labels: np.ndarray | None = None
    files: dict = field(default_factory=dict)


def legacy_fit(model, train_batches, vali_batches, cali_batches, model_dir, kind="single", lr=1e-5,
               scheduler_maxlr=1e-3, max_epoch=70, patience=10, loss="CrossEntropyLoss", test_name="model",
               before_step=None, before_eval=None) -> LegacyRun:
    """The legacy `train.py` training loop, single process (legacy-tsa.md §12), keeping its decisions and quirks.

    `train_batches(epoch)` yields epoch `epoch`'s training batches (the legacy loader shuffles; the caller fixes
    the order), `vali_batches` / `cali_batches` are re-iterable. Files go to `model_dir`: `{test_name}.pt` (best
    weights), `checkpoint.pt` (early-stopping file) and, only after an early stop, the score files and
    `percentile_score.pkl`. Harness hooks (not in train.py): `before_step(global_step)` right before each training
    forward pass, `before_eval(what, epoch)` right before each evaluation pass (`what`: "vali" each epoch,
    "best_vali" / "best_cali" for the final scoring of the reloaded best weights).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    best_path = model_dir / f"{test_name}.pt"
    optimizer, scheduler = make_optimizer(model, lr=lr, scheduler_maxlr=scheduler_maxlr, max_epoch=max_epoch)
    loss_fn = set_loss(loss, max_epoch=max_epoch)
    early_stopping = EarlyStopping(patience=patience, verbose=False, path=model_dir / "checkpoint.pt")
    best_auc = 0  # assumed starting value (legacy-tsa.md does not give it): any AUC above 0 is saved first
    run = LegacyRun(epochs=[], best_auc=0, best_epoch=None, flag_epoch=None, early_stopped=False)
    step = 0
    for epoch in range(max_epoch):
        if early_stopping.early_stop:  # legacy: the flag raised by the previous epoch is read here, at the top
            run.early_stopped = True
            model.load_state_dict(torch.load(best_path, weights_only=True))  # reload the best (strict) epoch
            if before_eval is not None:
                before_eval("best_vali", epoch)
            run.vali_scores, run.vali_labels, _ = evaluate(model, vali_batches, kind)
            if before_eval is not None:
                before_eval("best_cali", epoch)
            run.cali_scores, run.cali_labels, _ = evaluate(model, cali_batches, kind)
            write_score_files(model_dir, run.vali_scores, run.vali_labels, run.cali_scores, run.cali_labels)
            run.files = {name: model_dir / name for name in ("score_file.csv", "tag_file.csv", "cali_score_file.csv",
                                                            "cali_tag_file.csv", "percentile_score.pkl")}
            break
        lr_now = optimizer.param_groups[0]["lr"]
        losses = train_one_epoch(model, train_batches(epoch), optimizer, loss_fn, epoch, kind,
                                 before_step=before_step, step_offset=step)
        step += len(losses)
        scheduler.step()  # legacy: OneCycleLR stepped once per epoch
        if before_eval is not None:
            before_eval("vali", epoch)
        probs, labels, vali_loss = evaluate(model, vali_batches, kind, loss_fn)
        auc_raw = legacy_auc(labels, probs)
        auc = round(auc_raw, 4)  # legacy: both decisions below use the rounded AUC
        saved = auc > best_auc  # legacy: strict, a tie keeps the earlier epoch's file
        if saved:
            best_auc = auc
            run.best_epoch = epoch
            torch.save(model.state_dict(), best_path)
        early_stopping(-auc, model)
        if early_stopping.early_stop and run.flag_epoch is None:
            run.flag_epoch = epoch
        run.epochs.append(LegacyEpoch(epoch, lr_now, losses, vali_loss, auc_raw, auc, saved, early_stopping.counter,
                                      early_stopping.early_stop, probs))
    # legacy quirk: when max_epoch ends the loop (also when the last epoch raised the flag) nothing is scored or written
    run.best_auc = best_auc
    return run
