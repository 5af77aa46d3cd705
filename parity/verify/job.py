"""The job-level check, step by step: :func:`run` opens the legacy job (:func:`load_job`), builds the
legacy model and the port (:func:`~parity.verify.scoring.build_models`), plans how the job batched each
split (:func:`plan_splits`), scores and judges every split (:func:`verify_split`), optionally compares
training (:func:`~parity.verify.training.compare_training`) and writes the reports
(:func:`assemble_report`, :func:`~parity.verify.report.write_reports`)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_port.convert import ConvertError, load_file, split_legacy
from lightning_port.legacy_files import PERCENTILE_ROWS, read_percentile_table, read_score_file, read_tag_file
from lightning_port.legacy_hparams import (
    LegacyHyperparameters,
    LegacyJobError,
    check_state_dict,
    read_hyperparameters,
)
from lightning_port.legacy_job import LegacyJob, open_job

from ..compare import abs_diff
from ..tolerances import Tolerance
from .judging import (
    MODEL_TOL,
    PKL_TOL,
    SPLIT_FILES,
    WORST_ROWS,
    auc,
    diff_summary,
    file_tolerance,
    judge_file,
    operating_points,
    percentile_table,
    policy_table,
)
from .moe import MOE_ALPHA, MOE_LAMBDA_CONF, MOE_TAUS
from .options import PROG, Options, VerifyError, check_options
from .order import Plan, find_any_order, make_plan, order_for_split
from .report import ensure, plots, write_reports
from .scoring import Models, SplitData, build_models, recheck_rows, score_split
from .training import check_training_input, compare_training


@dataclass
class Job:
    """The legacy job as read: its SOURCE, typed hyperparameters, weights and own output files."""

    job: LegacyJob
    hp: LegacyHyperparameters
    label: str  # the model's name in messages
    legacy_sd: dict[str, torch.Tensor]
    fmt: str  # the legacy file format of the model
    files: dict[str, Path]  # the legacy outputs found, by name
    scores: dict[str, np.ndarray]  # *score_file.csv
    tags: dict[str, np.ndarray]  # *tag_file.csv
    table: np.ndarray | None  # percentile_score.pkl, (1000, 2)


def run(opts: Options) -> dict[str, Any]:
    """Verify; returns the report (also written under ``opts.out``). Raises :class:`VerifyError` to refuse."""
    started = time.time()
    splits, data_dir = check_options(opts)
    out = Path(opts.out)
    file_tol = file_tolerance(opts)
    notes: list[str] = []
    reasons: list[str] = []
    with contextlib.ExitStack() as stack:
        job = load_job(opts, stack)
        notes += job.job.notes
        models = build_models(job.hp, job.legacy_sd, job.label)
        batch_size, batch_from = _batch_size(opts, job.hp)
        k_draws = opts.moe_seeds if models.coin_flips else 1
        if models.coin_flips and k_draws < 2:
            raise VerifyError("--moe-seeds must be at least 2 for an MoE model with coin flips")
        workdir = Path(stack.enter_context(_private_dir()))
        check_training_input(job.hp, data_dir, opts.version, opts.train_epochs)

        datas = {s: SplitData(data_dir, s, job.hp.kind, opts.version, job.hp) for s in splits}
        plans, orders = plan_splits(opts, job, datas, batch_size, notes)
        progress = _progress(sum(len(p.batches) for p in plans.values()), opts.progress)
        tables: dict[str, tuple[np.ndarray, str]] = {}  # "legacy": the percentile table the operating points use
        if job.table is not None:
            tables["legacy"] = (job.table[:, 0], "percentile_score.pkl")
        report_splits: dict[str, Any] = {}
        # cali first: its table gives the vali operating points when the job has no percentile_score.pkl
        for i, s in sorted(enumerate(splits), key=lambda t: t[1] != "cali"):
            report_splits[s] = verify_split(opts, job, models, s, i, datas[s], plans[s], orders[s], k_draws, file_tol,
                                            tables, workdir, out, progress, notes, reasons)
        progress(0, close=True)
        training = (compare_training(opts, job.hp, job.legacy_sd, job.label, batch_size, batch_from, data_dir, out,
                                     workdir, reasons) if opts.train_epochs else None)
    report = assemble_report(opts, job, models, {s: report_splits[s] for s in splits}, training, data_dir, splits,
                             batch_size, batch_from, k_draws, file_tol, notes, reasons, started)
    write_reports(ensure(out), report)
    return report


# ------------------------------------------------------------------------------------------------ steps
def load_job(opts: Options, stack: contextlib.ExitStack) -> Job:
    """Open SOURCE (kept open by ``stack``), read its hyperparameters, weights and legacy files."""
    try:
        job = stack.enter_context(open_job(opts.source, opts.hparams, opts.test_name))
        if job.hparams is None:
            raise VerifyError(f"{opts.source}: no hyperparameters.json inside or beside it; pass --hparams "
                              "(SageMaker's hyperparameters.json of the job)")
        hp = read_hyperparameters(job.hparams)
        label = opts.source if job.source_kind == "file" else f"{opts.source}:{job.model_name}"
        legacy_sd, _training, fmt = split_legacy(load_file(job.model, opts.trust_pickle), label)
        check_state_dict(hp, legacy_sd, label)
        files = dict(job.outputs)
        scores = {n: read_score_file(p) for n, p in files.items() if n.endswith("score_file.csv")}
        tags = {n: read_tag_file(p) for n, p in files.items() if n.endswith("tag_file.csv")}
        table = (read_percentile_table(files["percentile_score.pkl"], PERCENTILE_ROWS)
                 if "percentile_score.pkl" in files else None)
    except (LegacyJobError, ConvertError) as e:
        raise VerifyError(str(e)) from None
    return Job(job, hp, label, legacy_sd, fmt, files, scores, tags, table)


def _batch_size(opts: Options, hp: LegacyHyperparameters) -> tuple[int, str]:
    """The batch size the job scored with, and where it comes from (for the report)."""
    if opts.batch_size:
        return opts.batch_size, "--batch-size"
    return hp["batch_size"], "batch_size " + ("from the hyperparameters" if "batch_size" in hp.explicit
                                              else "(train.py's default)")


def plan_splits(opts: Options, job: Job, datas: dict[str, SplitData], batch_size: int,
                notes: list[str]) -> tuple[dict[str, Plan], dict[str, str]]:
    """Per split: the legacy batches and line order (the DistributedSampler epoch found from the tag file when
    needed), after checking that the job's files belong to this split."""
    plans: dict[str, Plan] = {}
    orders: dict[str, str] = {}
    for s, data in datas.items():
        score_name, tag_name = SPLIT_FILES[s]
        tags = job.tags.get(tag_name)
        if tags is not None and len(tags) != data.n:
            raise VerifyError(f"{tag_name}: {len(tags)} labels; the {s} split has {data.n} rows: not this "
                              "split's file (or another data folder)")
        if score_name in job.scores and len(job.scores[score_name]) != data.n:
            raise VerifyError(f"{score_name}: {len(job.scores[score_name])} scores; the {s} split has "
                              f"{data.n} rows: not this split's file (or another data folder)")
        world, epoch, how = order_for_split(opts, s, data.y, tags, tag_name, job.hp["max_epoch"], notes)
        plan = make_plan(data.n, batch_size, world, epoch)
        if opts.rows is not None and opts.rows < data.n:
            plan = plan.limited(opts.rows)
        plans[s] = plan
        orders[s] = plan.describe() + (f" (epoch from {how})" if how else "")
    return plans, orders


def verify_split(opts: Options, job: Job, models: Models, s: str, i: int, data: SplitData, plan: Plan, order: str,
                 k_draws: int, file_tol: Tolerance, tables: dict[str, tuple[np.ndarray, str]], workdir: Path, out: Path,
                 progress: Callable[[int], None], notes: list[str], reasons: list[str]) -> dict[str, Any]:
    """Score split ``s`` (the ``i``-th asked for) both ways and judge it: (1) legacy model vs port, (2) the job's
    own files, the labels, the percentile table (cali), the operating points, the MoE policies and the plots."""
    sc = score_split(models, data, plan, i, k_draws, opts.seed, workdir, progress)
    n_lines = len(plan.line_rows)
    line_rows = plan.line_rows
    ref = sc.reference[:n_lines]
    port0 = np.asarray(sc.draws[0, :n_lines])
    labels = data.y[line_rows]
    entry: dict[str, Any] = {"rows": n_lines, "data_rows": data.n, "layout": data.layout, "order": order,
                             "batches": len(plan.batches)}
    entry.update(compare_legacy_model(models, data, plan, s, i, ref, port0, opts.seed, notes, reasons))
    # (2) the legacy job's own files
    score_name, tag_name = SPLIT_FILES[s]
    lf = job.scores.get(score_name)
    lf = lf[:n_lines] if lf is not None else None
    entry["auc"] = {"legacy": auc(labels, ref), "port": auc(labels, port0),
                    "legacy_file": auc(labels, lf) if lf is not None else None}
    if tag_name in job.tags:
        entry["tags"] = judge_tags(job, s, tag_name, data, plan, labels, reasons)
    if lf is not None:
        entry["legacy_file"] = judge_file(lf, sc, n_lines, line_rows, models.coin_flips, file_tol, s, score_name,
                                          reasons)
    # percentile table and operating points
    if s == "cali":
        entry["percentile_table"] = judge_percentile_table(opts, job, models, ref, port0, file_tol, tables, reasons)
    table, table_src = tables.get("legacy", (percentile_table(ref), f"the legacy model's {s} scores"))
    entry["operating_points"] = operating_points(table, table_src, ref, port0, line_rows, lf)
    if models.coin_flips:
        entry["moe_policies"] = policy_table(sc, n_lines, ref, table)
    entry["plots"] = plots(ensure(out), s, labels, ref, port0, lf) if opts.plots else []
    return entry


def compare_legacy_model(models: Models, data: SplitData, plan: Plan, s: str, i: int, ref: np.ndarray,
                         port0: np.ndarray, seed: int, notes: list[str], reasons: list[str]) -> dict[str, Any]:
    """Comparison (1), row by row under :data:`~parity.verify.judging.MODEL_TOL`; with coin flips, the rows
    beyond it are re-scored with fresh seeds (:func:`~parity.verify.scoring.recheck_rows`)."""
    line_rows = plan.line_rows
    cmp1 = diff_summary(ref, port0, MODEL_TOL, line_rows)
    beyond = cmp1.pop("_beyond")
    if len(beyond) and models.coin_flips:
        boundary, persistent = recheck_rows(models, data, plan, i, beyond, seed)
        cmp1["coin_boundary_rows"] = [int(line_rows[j]) for j in boundary]
        cmp1["rows_beyond_tolerance"] = int(len(persistent))
        cmp1["passed"] = len(persistent) == 0
        if len(boundary):
            notes.append(f"{s}: {len(boundary)} row(s) differ between the legacy model and the port only under "
                         "one seed and agree under fresh ones (coin flips at a rounding boundary): not counted")
    if not cmp1["passed"]:
        reasons.append(f"{s}: {cmp1['rows_beyond_tolerance']} row(s) where the port differs from the legacy "
                       f"model beyond tolerance (worst row {cmp1['worst_rows'][0]['row']}, "
                       f"|diff| {cmp1['max_abs_diff']:.3g})")
    return cmp1


def judge_tags(job: Job, s: str, tag_name: str, data: SplitData, plan: Plan, labels: np.ndarray,
               reasons: list[str]) -> dict[str, Any]:
    """The job's tag file against the data labels in the claimed order (a hint names the order it matches)."""
    line_rows = plan.line_rows
    tags = job.tags[tag_name][:len(line_rows)]
    bad = np.flatnonzero(tags != labels)
    tag_entry: dict[str, Any] = {"file": tag_name, "mismatches": int(len(bad)),
                                 "rows": [int(line_rows[j]) for j in bad[:WORST_ROWS]],
                                 "lines": [int(j) + 1 for j in bad[:WORST_ROWS]]}
    if len(bad):
        hint = find_any_order(data.y, job.tags[tag_name], range(0, job.hp["max_epoch"] + 2))
        if hint is not None:
            w, e = hint
            tag_entry["matching_order"] = "file order" if w is None else f"world size {w}, epoch {e}"
        reasons.append(f"{s}: {tag_name} disagrees with the data labels in the claimed order "
                       f"({plan.describe()}) on {len(bad)} line(s), first data row {int(line_rows[bad[0]])}"
                       + (f"; the file matches {tag_entry['matching_order']}" if hint else ""))
    return tag_entry


def judge_percentile_table(opts: Options, job: Job, models: Models, ref: np.ndarray, port0: np.ndarray,
                           file_tol: Tolerance, tables: dict[str, tuple[np.ndarray, str]],
                           reasons: list[str]) -> dict[str, Any]:
    """cali: the table regenerated from the port's scores against the job's ``percentile_score.pkl`` (or the
    legacy model's table), and the pickle against the table of the job's own ``cali_score_file.csv``."""
    regenerated = percentile_table(port0)
    tables.setdefault("legacy", (percentile_table(ref), "the legacy model's cali scores"))
    pt: dict[str, Any] = {"rows": PERCENTILE_ROWS, "legacy_source": tables["legacy"][1]}
    pt["max_abs_diff_port_vs_legacy"] = float(np.abs(regenerated - tables["legacy"][0]).max())
    pt["max_abs_diff_legacy_model_vs_legacy"] = float(np.abs(percentile_table(ref) - tables["legacy"][0]).max())
    if job.table is not None and "cali_score_file.csv" in job.scores and opts.rows is None:
        from_file = percentile_table(job.scores["cali_score_file.csv"])
        d = float(abs_diff(from_file, job.table[:, 0]).max())
        pt["legacy_file_consistent"] = bool(d <= PKL_TOL.atol)
        pt["max_abs_diff_pkl_vs_cali_score_file"] = d
        if d > PKL_TOL.atol:
            reasons.append(f"percentile_score.pkl is not the table of cali_score_file.csv (max |diff| {d:.3g})")
    if job.table is not None and not models.coin_flips and opts.rows is None:
        pt["passed"] = pt["max_abs_diff_port_vs_legacy"] <= file_tol.atol
        if not pt["passed"]:
            reasons.append(f"cali: the port's percentile table differs from percentile_score.pkl by "
                           f"{pt['max_abs_diff_port_vs_legacy']:.3g}")
    return pt


def assemble_report(opts: Options, job: Job, models: Models, report_splits: dict[str, Any], training: Any,
                    data_dir: Path, splits: list[str], batch_size: int, batch_from: str, k_draws: int, file_tol: Tolerance,
                    notes: list[str], reasons: list[str], started: float) -> dict[str, Any]:
    """The report (``report.json``'s content): verdict and reasons, the model, settings, splits and training."""
    hp = job.hp
    n_params = sum(p.numel() for p in models.port.parameters())
    return {
        "verdict": "pass" if not reasons else "fail",
        "reasons": reasons,
        "model": {"kind": hp.kind, "class": type(models.port).__name__,
                  "legacy_class": type(models.reference).__name__, "source": opts.source,
                  "source_kind": job.job.source_kind, "model_file": job.job.model_name, "legacy_format": job.fmt,
                  "parameters": int(n_params), "moe": bool(hp["use_moe"]), "coin_flips": models.coin_flips,
                  "hyperparameters_file": f"{job.job.hparams} ({job.job.hparams_where})",
                  "legacy_outputs": sorted(job.files), "other_files": job.job.extras},
        "hyperparameters": hp.as_dict(),
        "settings": {"data_dir": str(data_dir), "splits": splits, "batch_size": batch_size, "batch_size_from": batch_from,
                     "world_size": opts.world_size, "epoch": opts.epoch, "moe_seeds": k_draws if models.coin_flips else None,
                     "seed": opts.seed, "rows": opts.rows, "version": opts.version, "train_epochs": opts.train_epochs,
                     "tolerance_legacy_model": MODEL_TOL.as_dict(), "tolerance_legacy_file": file_tol.as_dict(),
                     "moe_criterion": {"taus": list(MOE_TAUS), "alpha": MOE_ALPHA, "lambda_confidence": MOE_LAMBDA_CONF}
                     if models.coin_flips else None},
        "splits": report_splits,
        "training": training,
        "notes": notes,
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------ plumbing
@contextlib.contextmanager
def _private_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tsa-verify-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class _progress:
    def __init__(self, total: int, enabled: bool | None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="batch", desc=PROG, file=sys.stderr, disable=(None if enabled is None
                        else not enabled), dynamic_ncols=True)

    def __call__(self, n: int, close: bool = False) -> None:
        if n:
            self.bar.update(n)
        if close:
            self.bar.close()
