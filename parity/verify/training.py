"""``--train-epochs N``: the training proof on the team's data -- the job's model fine-tuned from its
converted weights by the legacy ``train.py`` loop (``reference/``) and by ``Trainer.fit`` with
``legacy_selection``, compared epoch by epoch with the ``convergence`` category's protocol
(:mod:`parity.convergence`)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..convergence import Protocol, convergence_figure, run_convergence
from .options import Options, VerifyError
from .report import ensure
from .scoring import _expected_dims, build_models

TRAIN_PNG = "training_curves.png"
TRAIN_SPLITS = ("train", "vali", "cali")
# legacy reference.training.set_loss (what legacy_fit trains with): FocalLoss takes these defaults only
LEGACY_FIT_FOCAL = {"gamma": 2.0, "alpha": 0.25, "loss_reduction": "mean"}


def check_training_input(hp: Any, data_dir: Path, version: str, train_epochs: int) -> None:
    """Refuse ``--train-epochs`` before any work: a negative count, a loss the legacy loop of ``reference/``
    cannot train the way the job did, or splits the data reader rejects (a job without a train split)."""
    from lightning_port.data import DataError, detect_layout

    if train_epochs < 0:
        raise VerifyError(f"--train-epochs must be >= 0, got {train_epochs}")
    if not train_epochs:
        return
    if hp["loss"] == "BCEWithLogitsLoss":
        raise VerifyError(f"{hp.source}: loss = BCEWithLogitsLoss: the legacy set_loss cannot train a 2-class model "
                          "with it (legacy bug), so --train-epochs has no legacy run to compare with")
    if hp["loss"] == "FocalLoss":
        odd = [f"{k} = {hp.get(k)}" for k, v in LEGACY_FIT_FOCAL.items() if hp.get(k, v) != v]
        if odd:
            raise VerifyError(f"{hp.source}: FocalLoss with {', '.join(odd)}: the legacy loop of reference/ trains "
                              "FocalLoss with gamma 2, alpha 0.25, reduction mean only; --train-epochs cannot compare it")
    for split in TRAIN_SPLITS:
        try:
            detect_layout(data_dir, split, hp.kind, version)
        except DataError as e:
            raise VerifyError(f"--train-epochs needs the job's {split} split: {e}") from None


def training_data(data_dir: Path, hp: Any, version: str, rows: int | None, workdir: Path) -> tuple[Path, dict[str, int]]:
    """The folder the training comparison reads and its rows per split. Every split is read (and checked) by
    :func:`lightning_port.data.load_split`, flat or channel layout; with ``rows`` the first ``rows`` rows of each
    split are copied into a private flat folder (that is how ``--rows`` limits training)."""
    from lightning_port.data import DataError, layout_files, load_split

    loaded = {}
    for split in TRAIN_SPLITS:
        try:
            loaded[split] = load_split(data_dir, split, hp.kind, version, n_embedding=hp["n_embedding"],
                                       n_num_features=hp["n_num_features"], expected=[_expected_dims(hp)])
        except DataError as e:
            raise VerifyError(f"--train-epochs: {e}") from None
    if rows is None or all(len(ld) <= rows for ld in loaded.values()):
        return data_dir, {s: len(ld) for s, ld in loaded.items()}
    folder = workdir / "training_data"
    for split, ld in loaded.items():
        files = layout_files(folder, split, hp.kind, version, "flat")
        files["y"].parent.mkdir(parents=True, exist_ok=True)
        for key, arr in ld.arrays.items():
            np.save(files[key], np.ascontiguousarray(arr[:rows]))
    return folder, {s: min(len(ld), rows) for s, ld in loaded.items()}


def compare_training(opts: Options, hp: Any, legacy_sd: dict[str, torch.Tensor], label: str, batch_size: int,
                     batch_from: str, data_dir: Path, out: Path, workdir: Path, reasons: list[str]) -> dict[str, Any]:
    """``--train-epochs N``: the legacy ``train.py`` loop of ``reference/`` and ``Trainer.fit`` with
    ``legacy_selection``, both from the job's converted weights, for up to N epochs on the job's splits, compared
    epoch by epoch by :func:`parity.convergence.run_convergence` (the ``convergence`` parity category's protocol)."""
    n = opts.train_epochs
    folder, rows = training_data(data_dir, hp, opts.version, opts.rows, workdir)
    models = build_models(hp, legacy_sd, label)  # fresh copies: both are trained in place
    chaotic = hp.uses_moe
    protocol = Protocol(max_epochs=n, patience=hp["patience"], batch_size=batch_size, lr=hp["lr"],
                        scheduler_maxlr=hp["scheduler_maxlr"], loss=hp["loss"], data_seed=0)
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = run_convergence(models.reference, models.port, folder, hp.kind, protocol, workdir / "training",
                                  label=f"{label}, {n} epoch(s)", reference_threads=-1 if chaotic else None,
                                  version=opts.version)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    section = res.summary()
    failed = [name for name, c in res.comparisons.items() if not c.passed]
    for name in failed:
        c = res.comparisons[name]
        reasons.append(f"training: {name} beyond tolerance: {c.mismatches[0].describe(c.tolerance)}")
    L, P = res.legacy, res.port
    notes = [f"OneCycleLR runs over {n} epoch(s) (--train-epochs), not the job's max_epoch {hp['max_epoch']}: the "
             "learning-rate schedule is the job's shape compressed to N epochs",
             "both sides: fp32 on CPU, one process, training order the permutation of seed 0 + epoch "
             "(DistributedSampler(seed=0) with one replica), torch.manual_seed before every step and evaluation pass"]
    if hp["use_amp"]:
        notes.append("the job trained with use_amp 1 (fp16 autocast on its GPU); this comparison is fp32")
    if chaotic:
        notes.append(f"MoE with {hp['num_experts']} experts: value-dependent routing makes fp32 training chaotic "
                     "(docs/parity.md), so the legacy loop ran a second time with another thread count and the "
                     "curves are compared only while the legacy reproduces itself (horizon: "
                     + ("the whole run" if res.horizon is None else f"{res.horizon} epoch(s)") + ")")
    section.update(
        passed=not failed, failed=failed, epochs_requested=n, rows=rows, data=str(folder if folder == data_dir else
                                                                                  f"first {opts.rows} rows of {data_dir}"),
        hyperparameters={k: {"value": hp[k], "from": hp.origin(k)} for k in ("lr", "scheduler_maxlr", "loss",
                                                                             "patience", "max_epoch")}
        | {"batch_size": {"value": batch_size, "from": batch_from}},
        legacy_reference_run=chaotic,
        seconds_per_epoch={"legacy": round(L.seconds / max(L.epochs, 1), 3),
                           "port": round(P.seconds / max(P.epochs, 1), 3)},
        training_notes=notes, plot=None)
    if opts.plots:
        convergence_figure([res]).savefig(ensure(out) / TRAIN_PNG, dpi=90)
        section["plot"] = TRAIN_PNG
    return section
