"""Convergence parity: the legacy ``train.py`` loop and ``Trainer.fit`` side by side, epoch by epoch.

:func:`run_convergence` takes a legacy model (``reference/``), a port LightningModule holding the same
weights (converted through the weight map), a data folder in the legacy numpy layout and the training
settings, and runs

- the legacy side: :func:`reference.training.legacy_fit` (Adam + OneCycleLR per epoch, validation AUC
  ``round(auc, 4)``, best on strict improvement, the legacy ``EarlyStopping`` and its tie rule, the stop read
  at the top of the next epoch, best reloaded and scored, score files written);
- the port side: ``Trainer.fit`` from :func:`lightning_port.trainer.build_trainer` with
  ``legacy_selection=True`` on :class:`lightning_port.data.TSADataModule`, then ``Trainer.test`` /
  ``Trainer.predict`` on the best checkpoint (the ``ScoreWriter`` writes the score files);

under one protocol (:class:`Protocol`), so that the two runs see the same numbers:

- the same training order: epoch ``e`` visits the rows in the permutation
  ``torch.randperm(n, generator=torch.Generator().manual_seed(data_seed + e))``, batched in that order (the
  port's ``SeededEpochSampler`` with one replica; the legacy side gets the same list as its sampler);
- the same random draws: ``torch.manual_seed(step_seed_base + global_step)`` right before every training
  step (dropout, MoE coin flips; :mod:`parity.rng`), and ``torch.manual_seed(eval_seed_base + epoch)`` right
  before each epoch's validation pass (the legacy MoE flips coins in eval too), ``eval_seed_base + 1000`` /
  ``+ 1001`` before scoring the best weights on vali / cali;
- fp32 on CPU, validation and calibration in file order with the training batch size.

:func:`compare_convergence` turns the two runs into comparisons (per-epoch train loss, validation loss and
AUC with tolerances that grow with the step count, the selection decisions, the final score files), and
:func:`convergence_figure` draws both runs' curves with the chosen epochs marked. ``tsa-verify`` can run the
same comparison on a team's own data and model.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .compare import Comparison, Mismatch, compare
from .rng import STEP_SEED_BASE, ReseedPerStep
from .tolerances import (  # noqa: F401  (AUC_REASON, SELECTION_REASON, STEP_*: names of this module)
    AUC_FLOAT_ATOL,
    AUC_REASON,
    LABELS_EXACT,
    LEVELS_EXACT,
    PERCENTILE_LIPSCHITZ_REASON,
    SELECTION_REASON,
    STEP_REASON,
    STEP_TOL,
    Tolerance,
    step_tolerance,
)

EVAL_SEED_BASE = 10_000
BEST_VALI_SEED, BEST_CALI_SEED = 1000, 1001  # offsets from eval_seed_base for the final scoring


@dataclass(frozen=True)
class Protocol:
    """What both sides share: settings of the legacy job and the alignment of data order and seeds."""

    max_epochs: int = 20  # legacy max_epoch (also OneCycleLR's total_steps)
    patience: int = 3
    batch_size: int = 64
    lr: float = 1e-5
    scheduler_maxlr: float = 1e-3
    loss: str = "CrossEntropyLoss"
    data_seed: int = 0
    step_seed_base: int = STEP_SEED_BASE
    eval_seed_base: int = EVAL_SEED_BASE


@dataclass
class Curves:
    """One side's run. Epochs are 0-based; ``stop_epoch`` is the epoch whose validation raised early stopping."""

    step_losses: list[float] = field(default_factory=list)
    step_lrs: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # per epoch: mean of the per-batch (summed) losses
    vali_loss: list[float] = field(default_factory=list)  # per epoch: sum over validation batches
    auc_raw: list[float] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)  # round(auc, 4), what the decisions used
    epoch_scores: list[np.ndarray] = field(default_factory=list)  # softmax[:, -1] of each validation pass
    vali_labels: np.ndarray | None = None  # the validation labels, file order
    best_epoch: int | None = None
    stop_epoch: int | None = None
    vali_scores: np.ndarray | None = None  # the best weights on vali / cali (score files)
    vali_tags: np.ndarray | None = None
    cali_scores: np.ndarray | None = None
    cali_tags: np.ndarray | None = None
    percentile: list | None = None
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    # dual model: the card weight g1 (after the empty-card zeroing) of every training step ("train", step) and
    # validation batch ("vali", epoch, batch); the card path runs on rows with g1 > 0.05
    gates: dict[tuple, np.ndarray] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.auc)


@dataclass
class ConvergenceResult:
    legacy: Curves
    port: Curves
    protocol: Protocol
    steps_per_epoch: int
    n_vali: int
    label: str = ""
    reference: Curves | None = None  # the legacy loop again with another thread count (its own reproducibility)
    horizon: int | None = None  # epochs within which the legacy reproduces itself; None = the whole run
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    notes: str = ""

    @property
    def port_spread(self) -> float:
        """Largest |port - legacy| validation score over the epochs both trained."""
        return _spread(self.port, self.legacy)

    @property
    def legacy_spread(self) -> float | None:
        """Largest |legacy (other thread count) - legacy| validation score, or None without a reference run."""
        return None if self.reference is None else _spread(self.reference, self.legacy)

    def summary(self) -> dict:
        """The run for a JSON report: both sides' per-epoch curves (``[legacy, port]`` pairs for the decisions), the
        protocol, the spreads, and each comparison with its pass/fail, tolerance (the one at the last step compared)
        and worst error."""
        L, P = self.legacy, self.port
        return {
            "label": self.label, "protocol": asdict(self.protocol), "steps_per_epoch": self.steps_per_epoch,
            "vali_rows": self.n_vali, "epochs": [L.epochs, P.epochs], "best_epoch": [L.best_epoch, P.best_epoch],
            "stop_epoch": [L.stop_epoch, P.stop_epoch],
            "auc": {"legacy": L.auc, "port": P.auc}, "auc_raw": {"legacy": L.auc_raw, "port": P.auc_raw},
            "train_loss": {"legacy": L.train_loss, "port": P.train_loss},
            "vali_loss": {"legacy": L.vali_loss, "port": P.vali_loss},
            "max_port_score_diff": self.port_spread, "max_legacy_reference_score_diff": self.legacy_spread,
            "reproducibility_horizon": self.horizon,
            "seconds": {"legacy": round(L.seconds, 2), "port": round(P.seconds, 2),
                        "legacy_reference": None if self.reference is None else round(self.reference.seconds, 2)},
            "comparisons": {name: {"passed": c.passed, "tolerance": c.tolerance.as_dict(), "max_abs_err": c.max_abs_err,
                                   "max_rel_err": c.max_rel_err, "worst": c.worst_path, "values_compared": c.leaves,
                                   "mismatches": [m.describe(c.tolerance) for m in c.mismatches[:10]]}
                            for name, c in self.comparisons.items()},
            "notes": self.notes.strip(),
        }


def legacy_split(data_dir: str | Path, split: str, kind: str, version: str = "v0") -> dict[str, np.ndarray]:
    """One split read by the legacy reader of ``reference/``, in the layout the data has (flat or SageMaker channel
    folders, detected by :func:`lightning_port.data.detect_layout`, the one place that decides), memory-mapped
    read-only (the legacy's ``r+`` would need write access to a team's data)."""
    from lightning_port.data import detect_layout
    from reference.training import load_split

    layout = detect_layout(data_dir, split, kind, version)
    return load_split(data_dir, split, version, kind, layout=layout, mmap_mode="r")


def epoch_order(n: int, data_seed: int, epoch: int) -> list[int]:
    """The training order of ``epoch`` (``DistributedSampler(shuffle=True, seed=data_seed)`` with one replica)."""
    g = torch.Generator()
    g.manual_seed(data_seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def _mean_by_epoch(values: list[float], per_epoch: int, epochs: int) -> list[float]:
    return [float(np.mean(values[e * per_epoch:(e + 1) * per_epoch])) for e in range(epochs)]


# ---------------------------------------------------------------------------------------------- the two sides


def run_legacy(legacy: torch.nn.Module, data_dir: str | Path, kind: str, protocol: Protocol, out_dir: Path,
               version: str = "v0") -> Curves:
    """The legacy loop (``reference.training.legacy_fit``) under the protocol."""
    import time

    from torch.utils.data import DataLoader

    from reference.training import LegacyDataset, legacy_fit

    from .rng import reseed_for_step

    t0 = time.time()
    data = {s: LegacyDataset(legacy_split(data_dir, s, kind, version)) for s in ("train", "vali", "cali")}
    B, p = protocol.batch_size, protocol

    def train_batches(epoch: int):
        return DataLoader(data["train"], batch_size=B, sampler=epoch_order(len(data["train"]), p.data_seed, epoch))

    # Materialised once: iterating a DataLoader draws its base seed from the global generator, which would
    # shift the MoE coin flips after the protocol's evaluation reseed.
    vali = list(DataLoader(data["vali"], batch_size=B, shuffle=False))
    cali = list(DataLoader(data["cali"], batch_size=B, shuffle=False))
    lrs: list[float] = []

    phase: dict = {"key": None, "batch": 0}
    c = Curves()

    def before_step(step: int) -> None:
        phase["key"] = ("train", step)
        reseed_for_step(step, p.step_seed_base)

    def before_eval(what: str, epoch: int) -> None:
        phase["key"], phase["batch"] = ((what, epoch) if what == "vali" else None), 0
        offset = {"vali": epoch, "best_vali": BEST_VALI_SEED, "best_cali": BEST_CALI_SEED}[what]
        torch.manual_seed(p.eval_seed_base + offset)

    hooks = []
    if kind == "dual":  # record the card weight the legacy thresholds (empty-card rows zeroed as it does)
        from reference.models import EMPTY_CARD_HISTORY_MASK_SUM

        masks: dict = {}

        def keep_mask(module, args, kwargs):
            masks["empty"] = kwargs["key_padding_mask_ccid"].sum(dim=1) == EMPTY_CARD_HISTORY_MASK_SUM

        def keep_gate(module, args, out):
            if phase["key"] is None:
                return
            g1 = out.detach()[:, 1].clone().masked_fill(masks["empty"], 0.0).numpy()
            key = phase["key"] if phase["key"][0] == "train" else (*phase["key"], phase["batch"])
            phase["batch"] += 1
            c.gates[key] = g1

        hooks = [legacy.register_forward_pre_hook(keep_mask, with_kwargs=True),
                 legacy.gate_score.register_forward_hook(keep_gate)]
    try:
        run = legacy_fit(legacy, train_batches, vali, cali, out_dir, kind=kind, lr=p.lr,
                         scheduler_maxlr=p.scheduler_maxlr, max_epoch=p.max_epochs, patience=p.patience, loss=p.loss,
                         before_step=before_step, before_eval=before_eval)
    finally:
        for h in hooks:
            h.remove()
    for ep in run.epochs:
        c.step_losses += ep.train_losses
        lrs += [ep.lr] * len(ep.train_losses)
        c.train_loss.append(float(np.mean(ep.train_losses)))
        c.vali_loss.append(float(ep.vali_loss))
        c.auc_raw.append(float(ep.auc_raw))
        c.auc.append(float(ep.auc))
        c.epoch_scores.append(np.asarray(ep.vali_scores, np.float32))
    c.step_lrs = lrs
    c.vali_labels = np.concatenate([b["y"].numpy().reshape(-1) for b in vali])
    c.best_epoch, c.stop_epoch = run.best_epoch, run.flag_epoch
    if run.early_stopped:
        c.vali_scores, c.vali_tags = np.asarray(run.vali_scores, np.float32), np.asarray(run.vali_labels)
        c.cali_scores, c.cali_tags = np.asarray(run.cali_scores, np.float32), np.asarray(run.cali_labels)
        c.files = dict(run.files)
        c.percentile = pickle.loads(run.files["percentile_score.pkl"].read_bytes())
    c.seconds = time.time() - t0
    return c


def run_port(port, data_dir: str | Path, kind: str, protocol: Protocol, out_dir: Path, version: str = "v0") -> Curves:
    """``Trainer.fit`` with ``legacy_selection=True``, then test / predict on the best checkpoint."""
    import time

    import lightning.pytorch as pl

    from lightning_port.data import TSADataModule
    from lightning_port.scoring import read_score_file
    from lightning_port.selection import LegacyEarlyStopping, LegacyValAUC
    from lightning_port.trainer import build_trainer

    t0 = time.time()
    p = protocol
    port.hparams.max_epochs = p.max_epochs  # OneCycleLR's length, as the tsa CLI copies trainer.max_epochs
    if p.loss != port.hparams.get("loss", "CrossEntropyLoss"):
        raise ValueError(f"protocol loss {p.loss!r} but the port module was built with {port.hparams.get('loss')!r}")
    port.hparams.lr, port.hparams.scheduler_maxlr = p.lr, p.scheduler_maxlr
    # Trainer.fit (Lightning >= 2.2) trains a module in the mode it is handed; the port's on_train_epoch_start calls
    # train() as the legacy loop does every epoch (tests/test_port_module.py), and the port starts in train mode here
    # as well, so the comparison does not rest on that hook alone.
    port.train()

    class Record(pl.Callback):
        """Validation loss per epoch and the evaluation seeds of the protocol."""

        def __init__(self) -> None:
            self.vali_loss: list[float] = []
            self.scores: list[list[np.ndarray]] = []
            self.labels: list[np.ndarray] = []

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            torch.manual_seed(p.eval_seed_base + trainer.current_epoch)
            self.vali_loss.append(0.0)
            self.scores.append([])
            self.labels = []

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.vali_loss[-1] += float(outputs["loss"])
            self.scores[-1].append(outputs["probs"][:, -1].float().numpy())
            self.labels.append(outputs["y"].numpy())
            self._gate(pl_module, ("vali", trainer.current_epoch, batch_idx))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._gate(pl_module, ("train", trainer.global_step - 1))

        def _gate(self, pl_module, key) -> None:
            g = getattr(pl_module.network, "last_gate", None)
            if g is not None:
                gates[key] = g[:, 1].float().numpy().copy()

        def on_test_epoch_start(self, trainer, pl_module) -> None:
            torch.manual_seed(p.eval_seed_base + BEST_VALI_SEED)

        def on_predict_epoch_start(self, trainer, pl_module) -> None:
            torch.manual_seed(p.eval_seed_base + BEST_CALI_SEED)

    gates: dict[tuple, np.ndarray] = {}
    reseed, record = ReseedPerStep(p.step_seed_base), Record()
    dm = TSADataModule(str(data_dir), kind=kind, version=version, batch_size=p.batch_size, seed=p.data_seed,
                       num_workers=0)
    dm.configure_from_model(dict(port.hparams))
    trainer = build_trainer(accelerator="cpu", devices=1, precision="32", max_epochs=p.max_epochs, patience=p.patience,
                            legacy_selection=True, default_root_dir=str(out_dir), logger_name="port",
                            progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, plots=False,
                            log_every_n_steps=50, callbacks=[reseed, record])
    trainer.fit(port, datamodule=dm)
    auc_cb = next(cb for cb in trainer.callbacks if isinstance(cb, LegacyValAUC))
    stopper = next((cb for cb in trainer.callbacks if isinstance(cb, LegacyEarlyStopping)), None)
    c = Curves(step_losses=list(reseed.losses), step_lrs=list(reseed.lrs), vali_loss=record.vali_loss, gates=gates)
    c.epoch_scores = [np.concatenate(parts) for parts in record.scores]
    c.vali_labels = np.concatenate(record.labels) if record.labels else None
    c.auc_raw = [h[1] for h in auc_cb.history]
    c.auc = [h[2] for h in auc_cb.history]
    best_path = trainer.checkpoint_callback.best_model_path
    c.best_epoch = int(torch.load(best_path, map_location="cpu", weights_only=True)["epoch"]) if best_path else None
    c.stop_epoch = stopper.stop_epoch if stopper is not None else None
    steps = math.ceil(len(dm._load("train")) / p.batch_size)
    c.train_loss = _mean_by_epoch(c.step_losses, steps, c.epochs)
    if best_path:
        trainer.test(port, datamodule=dm, ckpt_path=best_path, verbose=False)
        trainer.predict(port, datamodule=dm, ckpt_path=best_path, return_predictions=False)
        run = Path(trainer.logger.log_dir)
        c.files = {name: run / name for name in ("score_file.csv", "tag_file.csv", "cali_score_file.csv",
                                                 "cali_tag_file.csv", "percentile_score.pkl")}
        c.vali_scores, c.cali_scores = read_score_file(c.files["score_file.csv"]), read_score_file(
            c.files["cali_score_file.csv"])
        c.vali_tags = np.loadtxt(c.files["tag_file.csv"], dtype=np.int64, ndmin=1)
        c.cali_tags = np.loadtxt(c.files["cali_tag_file.csv"], dtype=np.int64, ndmin=1)
        c.percentile = pickle.loads(c.files["percentile_score.pkl"].read_bytes())
    c.seconds = time.time() - t0
    return c


def run_convergence(legacy: torch.nn.Module, port, data_dir: str | Path, kind: str = "single",
                    protocol: Protocol | None = None, out_dir: str | Path | None = None, label: str = "",
                    reference_threads: int | None = -1, version: str = "v0") -> ConvergenceResult:
    """Run both sides on ``data_dir`` (legacy numpy layout: flat or SageMaker channel folders, files tagged
    ``version``) and compare them.

    ``legacy`` and ``port`` must hold the same weights (e.g. ``legacy_to_port`` of the legacy state); both are
    trained in place. ``reference_threads``: also run the legacy loop from the same weights with this many torch
    threads (``-1``: the current count + 1; ``None``: no reference run) to measure how far the legacy reproduces
    itself when only the rounding changes (:func:`reproducibility_horizon`). ``out_dir`` (default: a temporary
    folder) receives the legacy files under ``legacy/``, the port's run under ``port/``.
    """
    import copy

    protocol = protocol or Protocol()
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="tsa-convergence-") as tmp:
            return run_convergence(legacy, port, data_dir, kind, protocol, tmp, label, reference_threads, version)
    out = Path(out_dir)
    n_train = len(legacy_split(data_dir, "train", kind, version)["y"])
    n_vali = len(legacy_split(data_dir, "vali", kind, version)["y"])
    twin = copy.deepcopy(legacy) if reference_threads is not None else None
    lc = run_legacy(legacy, data_dir, kind, protocol, out / "legacy", version)
    pc = run_port(port, data_dir, kind, protocol, out / "port", version)
    ref = None
    if twin is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1 if reference_threads == -1 else reference_threads)
        try:
            ref = run_legacy(twin, data_dir, kind, protocol, out / "legacy_reference", version)
        finally:
            torch.set_num_threads(threads)
    res = ConvergenceResult(lc, pc, protocol, math.ceil(n_train / protocol.batch_size), n_vali, label, reference=ref)
    res.comparisons = compare_convergence(res)
    return res


def auc_tolerance(legacy_scores: np.ndarray, port_scores: np.ndarray, labels: np.ndarray) -> float:
    """The largest AUC difference the observed score differences can cause (``AUC_REASON``)."""
    s = np.asarray(legacy_scores, np.float64).reshape(-1)
    d = np.abs(np.asarray(port_scores, np.float64).reshape(-1) - s)
    y = np.asarray(labels).reshape(-1)
    is_pos = y == y.max()
    pos, neg, d_pos, d_neg = s[is_pos], s[~is_pos], d[is_pos], d[~is_pos]
    if pos.size == 0 or neg.size == 0:
        return 0.0
    near = np.abs(pos[:, None] - neg[None, :]) <= (d_pos[:, None] + d_neg[None, :])
    return float(near.sum()) / (pos.size * neg.size)


def legacy_decisions(aucs: list[float], patience: int) -> tuple[int | None, int | None]:
    """(best epoch, epoch that raised early stopping) by the legacy rules of ``reference/`` on rounded AUCs."""
    from reference.training import EarlyStopping

    es = EarlyStopping(patience=patience, path=None)
    best_auc, best_epoch = 0, None  # legacy_fit's starting best_auc
    for epoch, auc in enumerate(aucs):
        if auc > best_auc:
            best_auc, best_epoch = auc, epoch
        es(-auc, None)
        if es.early_stop:
            return best_epoch, epoch
    return best_epoch, None


def _per_epoch(actual: list, expected: list, tols: list[Tolerance], path: str, context: dict,
               unit: str = "epoch") -> Comparison:
    out = Comparison(tolerance=tols[-1] if tols else STEP_TOL, context=context)
    n = min(len(actual), len(expected))
    for e in range(n):
        out.merge(compare(actual[e], expected[e], tols[e], path=f"{path}[{unit} {e}, rtol {tols[e].rtol:.3g}]"))
    out.tolerance = tols[n - 1] if n else out.tolerance
    return out


def reproducibility_horizon(res: ConvergenceResult) -> int | None:
    """Epochs within which the legacy loop reproduces itself: the first epoch where the reference run (the legacy
    loop again, other thread count) leaves the step tolerance, in a step loss or a validation score; ``None`` when
    it never does (or there is no reference run)."""
    A, B = res.legacy, res.reference
    if B is None:
        return None
    k = res.steps_per_epoch
    for i in range(min(len(A.step_losses), len(B.step_losses))):
        if not compare(B.step_losses[i], A.step_losses[i], step_tolerance(i)).passed:
            horizon = i // k
            break
    else:
        horizon = None
    for e in range(min(A.epochs, B.epochs, horizon if horizon is not None else 1 << 30)):
        if not compare(B.epoch_scores[e], A.epoch_scores[e], step_tolerance((e + 1) * k)).passed:
            return e
    return horizon


def card_path_flip(res: ConvergenceResult) -> tuple[int, str, bool] | None:
    """The first training step or validation batch where the dual model's card-path decision (``g1 > 0.05``,
    legacy-tsa.md §9) differs between the sides: ``(epoch, description, explained)``, ``explained`` when every
    differing row's card weight agrees within the step tolerance (a threshold between two values that agree);
    ``None`` when the decisions never differ (or the model is single)."""
    from reference.models import GATE_THRESHOLD

    k = res.steps_per_epoch
    for key, gl in res.legacy.gates.items():
        gp = res.port.gates.get(key)
        if gp is None or gp.shape != gl.shape:
            continue
        differ = np.flatnonzero((gl > GATE_THRESHOLD) != (gp > GATE_THRESHOLD))
        if differ.size == 0:
            continue
        steps = key[1] if key[0] == "train" else (key[1] + 1) * k
        epoch = key[1] // k if key[0] == "train" else key[1]
        tol = step_tolerance(steps)
        a, b = gl[differ].astype(np.float64), gp[differ].astype(np.float64)
        explained = bool(np.all(np.abs(a - b) <= tol.atol + tol.rtol * np.abs(a)))
        where = f"training step {key[1]}" if key[0] == "train" else f"validation of epoch {key[1]}, batch {key[2]}"
        desc = (f"the card-path decision (g1 > {GATE_THRESHOLD}) differs at {where}, row(s) {differ.tolist()[:5]}: "
                f"legacy g1 {a.tolist()[:5]} vs port {b.tolist()[:5]}")
        return epoch, desc, explained
    return None


def compare_convergence(res: ConvergenceResult) -> dict[str, Comparison]:
    """The comparisons of one run (keys ``convergence.<check>``); see the module docstring.

    Curves are compared epoch by epoch over the epochs both sides trained, up to the legacy's reproducibility
    horizon (:func:`reproducibility_horizon`; the whole run when the legacy reproduces itself throughout, as in the
    default profile). The decisions and the score files are compared when the legacy took them within it.
    """
    L, P = res.legacy, res.port
    k = res.steps_per_epoch
    res.horizon = reproducibility_horizon(res)
    if res.horizon is not None:
        res.notes += (f"the legacy loop reproduces itself (reference run with another thread count) within the step "
                      f"tolerance only for {res.horizon} epoch(s): compared up to there. ")
    flip = card_path_flip(res)
    flip_problem = None
    if flip is not None and (res.horizon is None or flip[0] < res.horizon):
        if flip[2]:
            res.notes += (f"{flip[1]}, within the step tolerance: a threshold between two values that agree; from "
                          f"there the runs draw different dropout masks, so they are compared up to epoch {flip[0]}. ")
            res.horizon = flip[0]
        else:
            flip_problem = flip[1] + " (beyond the step tolerance)"
    n = min(L.epochs, P.epochs, res.horizon if res.horizon is not None else 1 << 30)
    context = {"label": res.label, "protocol": res.protocol, "epochs": (L.epochs, P.epochs)}
    tols = [step_tolerance((e + 1) * k) for e in range(max(L.epochs, P.epochs, 1))]

    train_tols = [step_tolerance((e + 1) * k - 1) for e in range(n)]  # the epoch's last step
    train = _per_epoch(P.train_loss[:n], L.train_loss[:n], train_tols, "train_loss", context)
    step_tols = [step_tolerance(i) for i in range(n * k)]
    train.merge(_per_epoch(P.step_losses[:n * k], L.step_losses[:n * k], step_tols, "step_loss", context,
                           unit="step"))
    from .tolerances import tolerance_for

    train.merge(compare(P.step_lrs[:n * k], L.step_lrs[:n * k], tolerance_for("training.lrs"), path="lr"))
    vali = _per_epoch(P.vali_loss[:n], L.vali_loss[:n], tols, "vali_loss", context)
    vali.merge(_per_epoch(P.epoch_scores[:n], L.epoch_scores[:n], tols, "vali_scores", context))

    # AUC: per epoch, only the pairs that the observed score differences can swap may move it
    auc = Comparison(tolerance=Tolerance(0.0, 0.0, AUC_REASON), context=context)
    labels = L.vali_labels
    allowed = [AUC_FLOAT_ATOL + auc_tolerance(L.epoch_scores[e], P.epoch_scores[e], labels) for e in range(n)]
    for e in range(n):
        auc.merge(compare(P.auc_raw[e], L.auc_raw[e], Tolerance(0.0, allowed[e], AUC_REASON),
                          path=f"auc[epoch {e}, atol {allowed[e]:.3g}]"))
    auc.tolerance = Tolerance(0.0, max(allowed, default=0.0), AUC_REASON)

    # selection: the port's decisions are the legacy rules on its own AUCs; and the same decisions as the legacy's
    sel = Comparison(tolerance=Tolerance(0.0, 0.0, SELECTION_REASON), context=context, leaves=1)
    problems = []
    expected_port = legacy_decisions(P.auc, res.protocol.patience)
    if (P.best_epoch, P.stop_epoch) != expected_port:
        problems.append(f"port decisions (best {P.best_epoch}, stop {P.stop_epoch}) are not the legacy rules on its "
                        f"own rounded AUCs (best {expected_port[0]}, stop {expected_port[1]})")
    if flip_problem:
        problems.append(flip_problem)
    for side, c in (("legacy", L), ("port", P)):
        for e, (raw, rounded) in enumerate(zip(c.auc_raw, c.auc)):
            if rounded != round(float(raw), 4):
                problems.append(f"{side} rounded AUC {rounded} at epoch {e} is not round({raw!r}, 4)")
    straddles = [e for e in range(n) if L.auc[e] != P.auc[e]]
    last = L.stop_epoch if L.stop_epoch is not None else L.epochs - 1  # the legacy's last decision
    decided_within = res.horizon is None or last < res.horizon
    if straddles and all(abs(L.auc_raw[e] - P.auc_raw[e]) <= allowed[e] for e in straddles):
        res.notes += (f"the rounded AUC differs at epoch(s) {straddles} where the raw AUCs agree within tolerance "
                      f"({[(L.auc_raw[e], P.auc_raw[e]) for e in straddles]}): a rounding boundary lies between "
                      "them, so the decisions are compared up to there only. ")
        decided_within = False
    for e in straddles:
        if abs(L.auc_raw[e] - P.auc_raw[e]) > allowed[e]:
            problems.append(f"rounded AUC at epoch {e}: port {P.auc[e]} vs legacy {L.auc[e]}")
    if decided_within:
        for what, a, b in (("best epoch", P.best_epoch, L.best_epoch),
                           ("early-stopping epoch", P.stop_epoch, L.stop_epoch), ("epochs trained", P.epochs, L.epochs)):
            if a != b:
                problems.append(f"{what}: port {a} vs legacy {b}")
    if L.stop_epoch is None:
        res.notes += f"no early stop within max_epochs {res.protocol.max_epochs}. "
    sel.mismatches = [Mismatch("selection", "structure", detail=p) for p in problems]

    # the final score files: the reloaded best weights on vali and cali
    files = Comparison(tolerance=STEP_TOL, context=context)
    if L.vali_scores is None:
        # legacy quirk: no files unless the stop flag was read at the top of a next epoch (the decisions are
        # compared under selection)
        files.leaves = 1
        res.notes += "the legacy loop wrote no score files (its stop did not take effect before max_epochs). "
    elif P.vali_scores is None:
        files.mismatches.append(Mismatch("score_files", "missing", detail="the port run has no best checkpoint"))
    elif decided_within and L.best_epoch == P.best_epoch:
        tol = tols[L.best_epoch]
        files = compare({"score_file": P.vali_scores, "cali_score_file": P.cali_scores},
                        {"score_file": L.vali_scores, "cali_score_file": L.cali_scores}, tol, context=context)
        files.merge(compare({"tag_file": P.vali_tags, "cali_tag_file": P.cali_tags},
                            {"tag_file": L.vali_tags, "cali_tag_file": L.cali_tags}, LABELS_EXACT))
        bound = float(np.max(tol.atol + tol.rtol * np.abs(L.cali_scores.astype(np.float64))))
        pct = Tolerance(0.0, bound, PERCENTILE_LIPSCHITZ_REASON)
        files.merge(compare([r[0] for r in P.percentile], [r[0] for r in L.percentile], pct, path="percentile_score"))
        files.merge(compare([r[1] for r in P.percentile], [r[1] for r in L.percentile], LEVELS_EXACT,
                            path="percentile_levels"))
        files.tolerance = tol
    return {"convergence.train_loss": train, "convergence.vali_loss": vali, "convergence.auc": auc,
            "convergence.selection": sel, "convergence.score_files": files}


def _spread(a: Curves, b: Curves) -> float:
    """Largest |a - b| over the validation scores of the epochs both trained (for the report)."""
    n = min(a.epochs, b.epochs)
    return max((float(np.abs(a.epoch_scores[e].astype(np.float64) - b.epoch_scores[e]).max()) for e in range(n)),
               default=0.0)


# ---------------------------------------------------------------------------------------------- the picture

LEGACY_STYLE = {"color": "tab:blue", "ls": "-", "lw": 2.2, "alpha": 0.75}
PORT_STYLE = {"color": "tab:orange", "ls": "--", "lw": 1.4}
VALI_COLORS = {"legacy": "tab:green", "port": "tab:red"}


def tolerance_used(res: ConvergenceResult, other: Curves, epoch: int, floor: float = 1e-6) -> float:
    """Worst |other - legacy| / allowed over the validation scores of ``epoch`` (1 = the step tolerance); bit-equal
    epochs give ``floor`` (the bottom of a log axis)."""
    tol = step_tolerance((epoch + 1) * res.steps_per_epoch)
    s = res.legacy.epoch_scores[epoch].astype(np.float64)
    ratio = np.abs(other.epoch_scores[epoch] - s) / (tol.atol + tol.rtol * np.abs(s))
    return max(float(ratio.max()), floor)


def convergence_figure(results: list[ConvergenceResult], max_rows: int = 8):
    """Both runs' curves, one row per result: loss per epoch (train: mean per-row loss of the training batches;
    validation: per-row loss over the validation set), validation AUC (raw; the rounded value the decisions used
    drawn as steps) with the best epoch (star) and the epoch that raised early stopping (vertical line), and the
    distance between the runs per epoch as the share of the step tolerance used by the worst validation score
    (1 = the tolerance), next to the legacy's own (legacy with another thread count vs legacy) when it ran."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = results[:max_rows]
    fig = Figure(figsize=(16, 3.3 * max(len(results), 1)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(results), 1), 3, squeeze=False)
    for row, res in zip(axes, results):
        ax_loss, ax_auc, ax_diff = row
        for side, curves, style in (("legacy", res.legacy, LEGACY_STYLE), ("port", res.port, PORT_STYLE)):
            ep = np.arange(curves.epochs)
            ax_loss.plot(ep, np.asarray(curves.train_loss) / res.protocol.batch_size, marker="o", ms=3,
                         label=f"{side} train", **style)
            ax_loss.plot(ep, np.asarray(curves.vali_loss) / max(res.n_vali, 1), marker="s", ms=3,
                         label=f"{side} validation", **{**style, "color": VALI_COLORS[side]})
            ax_auc.plot(ep, curves.auc_raw, marker="o", ms=3, label=f"{side} AUC", **style)
            ax_auc.step(ep, curves.auc, where="mid", color=style["color"], lw=0.8, alpha=0.5)
            big = side == "legacy"
            if curves.best_epoch is not None:
                ax_auc.plot([curves.best_epoch], [curves.auc_raw[curves.best_epoch]], marker="*",
                            ms=16 if big else 9, color=style["color"], mfc="none" if big else style["color"],
                            ls="none", label=f"{side} best epoch {curves.best_epoch}")
            if curves.stop_epoch is not None:
                for ax in (ax_loss, ax_auc):
                    ax.axvline(curves.stop_epoch, color=style["color"], ls=":" if big else "--", lw=1.5 if big else 1)
                ax_auc.plot([], [], color=style["color"], ls=":" if big else "--",
                            label=f"{side} stop after epoch {curves.stop_epoch}")
        n = min(res.legacy.epochs, res.port.epochs)
        ep = np.arange(n)
        ax_diff.semilogy(ep, [tolerance_used(res, res.port, e) for e in ep], marker="o", ms=3, color=PORT_STYLE["color"],
                         label="port vs legacy")
        if res.reference is not None:
            m = min(n, res.reference.epochs)
            ax_diff.semilogy(np.arange(m), [tolerance_used(res, res.reference, e) for e in range(m)], marker="^", ms=3,
                             color="tab:gray", label="legacy (other thread count) vs legacy")
        ax_diff.axhline(1.0, color="tab:red", ls="--", lw=1, label="tolerance (grows with the steps)")
        if res.horizon is not None:
            ax_diff.axvline(res.horizon - 0.5, color="tab:gray", ls=":", label="legacy reproducibility horizon")
        ax_loss.set(xlabel="epoch", ylabel="loss per row (cross-entropy)", title=f"{res.label}: loss")
        ax_auc.set(xlabel="epoch", ylabel="validation AUC", title=f"{res.label}: AUC (steps: round(auc, 4))")
        ax_diff.set(xlabel="epoch", ylabel="worst |difference| / allowed, validation scores",
                    title=f"{res.label}: share of the tolerance used")
        for ax in (ax_loss, ax_auc, ax_diff):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
