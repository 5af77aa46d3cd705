"""``tsa-verify``: prove the port equal to a team's own legacy job, on their data, against their score files.

::

    tsa-verify SOURCE --data-dir DATA [--hparams H] [--split vali|cali|all] [--batch-size N]
               [--world-size N] [--epoch E] [--moe-seeds K] [--rows N] [--train-epochs N]
               [--out reports/verify]
    python -m parity verify ...        # the same command

SOURCE is what the legacy SageMaker job left: ``model.tar.gz``, its extracted folder, or a model
file (:func:`lightning_port.legacy_job.open_job`). The model is converted in memory and every row of
the splits is scored by ``reference/`` (the legacy model, fed by the legacy data loader) and by the
port (fed by :mod:`lightning_port.data`), batched as the legacy job batched them (legacy-tsa §12):
the job's ``batch_size`` (``--batch-size`` overrides), file order, last batch short; with
``--world-size N`` each rank's share of the ``DistributedSampler`` order (shuffle on, seed 0,
``set_epoch(epoch)``), batched separately, gathered rank-major and cut to N.

Two comparisons, both reported (docs/verify.md says what each number means):

1. legacy model vs port on the same batches and the same seeds, row by row (deterministic, MoE
   coin flips included) to the tolerance of ``tsa-convert --verify``;
2. the legacy job's own files (``score_file.csv`` / ``tag_file.csv``, ``cali_*``,
   ``percentile_score.pkl``) vs the port: row by row for models whose scores do not depend on coin
   flips; for MoE models with coin flips the statistical criterion of :func:`judge_moe`.

With ``--train-epochs N``, a third: the legacy ``train.py`` loop and ``Trainer.fit`` fine-tuning the
job's model side by side for up to N epochs (:func:`compare_training`, the comparison of
:mod:`parity.convergence`).

Writes ``report.json``, ``report.md`` and PNGs under ``--out``. Exit 0 pass, 1 beyond tolerance,
2 refused (one line on stderr). Memory: the splits are memory-mapped and scored batch by batch;
per split the command keeps O(rows) float32 arrays (the MoE draws on disk in a private temporary
folder) and one batch of each model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FILE_TOL",
    "MODEL_TOL",
    "MoEJudgement",
    "Plan",
    "VerifyError",
    "ddp_order",
    "find_epochs",
    "judge_moe",
    "main",
    "make_plan",
    "run",
]

PROG = "tsa-verify"
EXIT_PASS, EXIT_FAIL, EXIT_REFUSED = 0, 1, 2
SPLIT_FILES = {"vali": ("score_file.csv", "tag_file.csv"), "cali": ("cali_score_file.csv", "cali_tag_file.csv")}
OPERATING_POINTS = (0.001, 0.005, 0.01, 0.05)  # top 0.1 / 0.5 / 1 / 5 % by the legacy percentile table
PERCENTILE_ROWS = 1000
WORST_ROWS = 20
FLIP_ROWS_LISTED = 20
DEFAULT_MOE_SEEDS = 16
MAX_WORLD_SEARCHED = 8  # hint search when tag_file.csv is not in the claimed order
RECHECK_SEEDS = 2  # MoE comparison (1): fresh seed pairs for rows beyond tolerance
MAX_RECHECK_BATCHES = 64
MOE_TAUS = (0.5, 1.0, 2.0, 4.0)  # MoE criterion: levels (excess beyond the envelope, in envelope widths)
MOE_ALPHA = 1e-2  # MoE criterion: nominal false-alarm bound of the count tests together (Bonferroni), per split
MOE_LAMBDA_CONF = 0.95  # upper confidence bound on the null exceedance rate estimated from the draws
DRAWS_IN_MEMORY_BYTES = 256 << 20  # above this the MoE draws go to a memory-mapped file


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    reason: str

    def ok(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``|a - b| <= atol + rtol * |b|`` elementwise; NaN equals NaN."""
        with np.errstate(invalid="ignore"):
            close = np.abs(a.astype(np.float64) - b) <= self.atol + self.rtol * np.abs(b.astype(np.float64))
        return close | (np.isnan(a) & np.isnan(b))

    def as_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "rtol": self.rtol, "reason": self.reason}


# (1) the same CPU, the same fp32 function computed by two implementations: tsa-convert --verify's tolerance
MODEL_TOL = Tol(1e-5, 1e-4, "legacy model and port on the same CPU, the same batches and seeds: fp32 sums in a "
                "different association order (the tolerance of tsa-convert --verify; parity forward worst ~5e-6)")
# (2) the legacy job scored on its GPU; its files hold exact float32 values (str(np.float32(v)))
FILE_TOL = Tol(1e-4, 0.0, "the legacy job scored on a GPU in fp32 (exact float32 in the file): GPU and CPU sum in "
               "different orders, fp32 rounding of ~1e-6 relative per layer (an estimate, not measured on a GPU here); "
               "1e-4 on a probability leaves margin for it and still sees a 0.01 move")


class VerifyError(Exception):
    """Refused: one line, exit 2."""


# ----------------------------------------------------------------------------------- the legacy order
def ddp_order(n: int, world: int, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The legacy multi-GPU order (§12) as torch implements it: each rank's share of
    ``DistributedSampler(shuffle=True, seed=0)`` after ``set_epoch(epoch)`` (a permutation of
    ``Generator().manual_seed(epoch)``, padded by repeating its head to a multiple of ``world``,
    rank r taking ``padded[r::world]``), and the rank-major gather cut to ``n``: line k of a legacy
    multi-GPU score file holds data row ``order[k]``."""
    from torch.utils.data import DistributedSampler

    shares = []
    for r in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=0, drop_last=False)
        sampler.set_epoch(epoch)
        shares.append(np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler)))
    gathered = np.concatenate(shares) if shares else np.zeros(0, np.int64)
    return gathered[:n], shares


@dataclass
class Batch:
    rank: int
    index: int  # batch number on its rank
    rows: np.ndarray  # data rows, in the batch's order
    slot: int  # position of the batch's first entry in the rank-major gather


@dataclass
class Plan:
    """How the legacy job batched a split, and which data row each line of its score file holds."""

    n_data: int
    batch_size: int
    world: int | None
    epoch: int | None
    batches: list[Batch]
    line_rows: np.ndarray  # (n_lines,) data row of each legacy score-file line
    n_slots: int

    def describe(self) -> str:
        if self.world is None:
            return f"file order, batches of {self.batch_size}"
        return (f"DistributedSampler order of world size {self.world}, epoch {self.epoch}: each rank's share "
                f"batched by {self.batch_size}, gathered rank-major, cut to {self.n_data}")

    def limited(self, n_lines: int) -> Plan:
        """The batches needed for the first ``n_lines`` legacy lines (whole batches: MoE capacity couples a batch)."""
        need = [b for b in self.batches if b.slot < n_lines]
        return Plan(self.n_data, self.batch_size, self.world, self.epoch, need, self.line_rows[:n_lines],
                    self.n_slots)


def make_plan(n: int, batch_size: int, world: int | None = None, epoch: int | None = None) -> Plan:
    if world is None:
        batches = [Batch(0, i, np.arange(s, min(s + batch_size, n)), s) for i, s in enumerate(range(0, n, batch_size))]
        return Plan(n, batch_size, None, None, batches, np.arange(n), n)
    order, shares = ddp_order(n, world, epoch or 0)
    batches, slot = [], 0
    for r, share in enumerate(shares):
        for i, s in enumerate(range(0, len(share), batch_size)):
            rows = share[s:s + batch_size]
            batches.append(Batch(r, i, rows, slot))
            slot += len(rows)
    return Plan(n, batch_size, world, epoch, batches, order, slot)


def _gathered_orders(n: int, worlds: Sequence[int], epochs: Sequence[int]) -> Iterator[tuple[int, int, np.ndarray]]:
    """(world, epoch, line -> row) for many candidates, fast: the epoch's permutation is drawn once
    (``randperm`` of ``Generator().manual_seed(epoch)``, as DistributedSampler draws it) and shared by
    every world size; padding repeats it cyclically, rank r takes ``padded[r::world]``. Used only to
    SEARCH; the plan that is scored is built by torch's DistributedSampler itself (:func:`ddp_order`), and
    tests check the two agree."""
    for e in epochs:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0 + e)).numpy()
        for w in worlds:
            total = -(-n // w) * w
            padded = np.resize(perm, total)
            yield w, e, padded.reshape(-1, w).T.reshape(-1)[:n]


def find_epochs(y: np.ndarray, tags: np.ndarray, world: int, epochs: range) -> list[int]:
    """The epochs whose DistributedSampler order puts the labels ``y`` in the order of ``tags``."""
    if len(tags) != len(y):
        return []
    return [e for _, e, order in _gathered_orders(len(y), [world], epochs) if np.array_equal(y[order], tags)]


def find_any_order(y: np.ndarray, tags: np.ndarray, epochs: range) -> tuple[int | None, int | None] | None:
    """A (world, epoch) that explains ``tags`` (``(None, None)``: file order), for hints."""
    if len(tags) != len(y):
        return None
    if np.array_equal(y, tags):
        return None, None
    for w, e, order in _gathered_orders(len(y), range(1, MAX_WORLD_SEARCHED + 1), epochs):
        if np.array_equal(y[order], tags):
            return w, e
    return None


# ------------------------------------------------------------------------------- the MoE criterion
@dataclass
class MoEJudgement:
    """The legacy file of an MoE model with coin flips, judged against K port draws (see :func:`judge_moe`)."""

    passed: bool
    rows: int
    draws: int
    certified_rows: int  # rows whose score does not depend on the coin flips (checked row by row)
    certified_failures: np.ndarray  # row positions: certified rows where the legacy file deviates
    exceed_rows: np.ndarray  # row positions: uncertified rows beyond the envelope at the lowest level, worst first
    levels: list[dict[str, Any]]  # per level tau: legacy count, the draws' counts, rate bound, p-value
    p_value: float  # the smallest level p-value times the number of levels (Bonferroni)
    pooled: bool  # certified rows joined the count test (a port draw deviated on a certified row)
    alpha: float
    score: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # (rows,) excess / width

    @property
    def exceed_count(self) -> int:
        return int(self.levels[0]["legacy_count"]) if self.levels else 0

    @property
    def null_counts(self) -> list[int]:
        return list(self.levels[0]["draw_counts"]) if self.levels else []

    @property
    def deciding_level(self) -> dict[str, Any]:
        return min(self.levels, key=lambda lv: lv["p_value"])

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rows": self.rows, "draws": self.draws,
                "certified_rows": self.certified_rows, "certified_failures": int(len(self.certified_failures)),
                "stochastic_rows": self.rows - self.certified_rows, "exceedances": self.exceed_count,
                "levels": self.levels, "p_value": self.p_value, "pooled": self.pooled, "alpha": self.alpha}


def _poisson_sf(count: float, lam: float) -> float:
    """P(X >= count) for X ~ Poisson(lam), continued to non-integer counts (regularised incomplete gamma)."""
    from scipy.special import gammainc

    if count <= 0:
        return 1.0
    if lam <= 0:
        return 0.0
    return float(gammainc(count, lam))


def judge_moe(legacy: np.ndarray, draws: np.ndarray, anchors: np.ndarray, tol: Tol = FILE_TOL, *,
              taus: Sequence[float] = MOE_TAUS, alpha: float = MOE_ALPHA, chunk: int = 1 << 18) -> MoEJudgement:
    """Judge a legacy score file of an MoE model whose eval scores depend on unrecorded coin flips.

    ``legacy`` (n,) the file; ``draws`` (K, n) the port with K fresh seeds, batched as the job;
    ``anchors`` (m, n) the port under the deterministic policies ``all`` and ``threshold`` — the two
    extremes of the legacy coin (u -> 0 keeps every second expert, u -> 1 keeps those with gate > 0.2).

    For each of the K + 1 exchangeable vectors V_j (j = 0 the legacy file, j >= 1 a port draw) and each
    row, the envelope is [min, max] of the other K vectors and the anchors, of width w; V_j's
    *excess* is its distance outside the envelope less the tolerance, and its ratio r = excess / w.

    - Rows whose envelope is no wider than the tolerance (every draw and both extremes agree: the
      score does not depend on the coin flips) are *certified* and checked row by row: one legacy
      excess fails, as for a model without MoE.
    - On the other rows, for each level tau in ``taus``, the legacy file's count of rows with
      r > tau is compared with the draws' own counts (each draw playing the legacy file against the
      others: under the null, the file from the same model on the same batches with unknown coin
      flips, it is exchangeable with them). The count is taken as Poisson, rate bounded above by the
      ``MOE_LAMBDA_CONF`` upper limit of the draws' mean (scaled by the draws' overdispersion when
      their mean is >= 1); the file fails when some level's P(count >= observed) < alpha / len(taus).
      Low levels see many small moves, high levels a few large ones relative to their rows' spread.
    - If a draw itself deviates on a certified row (the certificate missed a rare flip), certified
      rows join the counts instead (``pooled``).
    """
    from scipy.stats import chi2

    legacy = np.asarray(legacy, dtype=np.float32)
    n = legacy.shape[0]
    K = int(draws.shape[0])
    if K < 2:
        raise VerifyError("--moe-seeds must be at least 2 for an MoE model with coin flips")
    taus = sorted(float(t) for t in taus)
    cert0 = np.zeros(n, dtype=bool)
    score0 = np.zeros(n, dtype=np.float64)
    counts = np.zeros((len(taus), K + 1), dtype=np.int64)  # uncertified exceedances per level and vector
    cert_dev = np.zeros(K + 1, dtype=np.int64)  # exceedances on certified rows per vector
    cert_counts = np.zeros((len(taus), K + 1), dtype=np.int64)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        V = np.concatenate([legacy[None, sl], np.asarray(draws[:, sl], dtype=np.float32)]).astype(np.float64)
        A = np.asarray(anchors[:, sl], dtype=np.float64)
        finite = np.isfinite(V).all(0) & np.isfinite(A).all(0)
        Vf = np.where(np.isfinite(V), V, 0.0)
        Af = np.where(np.isfinite(A), A, 0.0)
        part = np.partition(Vf, (0, 1, K - 1, K), axis=0)
        amin, amax = Vf.argmin(0), Vf.argmax(0)
        a_lo, a_hi = Af.min(0), Af.max(0)
        for j in range(K + 1):
            d_lo = np.where(amin == j, part[1], part[0])
            d_hi = np.where(amax == j, part[K - 1], part[K])
            lo, hi = np.minimum(d_lo, a_lo), np.maximum(d_hi, a_hi)  # the anchors bound the support (measured:
            tol_i = tol.atol + tol.rtol * np.abs((lo + hi) / 2)      # the draws alone give heavier null tails)
            cert = hi - lo <= tol_i
            width = hi - lo
            v = Vf[j]
            excess = np.maximum(np.maximum(lo - v, v - hi), 0.0) - tol_i
            ratio = np.where(~finite, np.inf, np.where(excess > 0, excess / np.maximum(width, tol_i), 0.0))
            cert_dev[j] += int((cert & (ratio > 0)).sum())
            for li, t in enumerate(taus):
                hit = ratio > t
                counts[li, j] += int((hit & ~cert).sum())
                cert_counts[li, j] += int((hit & cert).sum())
            if j == 0:
                cert0[sl] = cert
                score0[sl] = ratio
    pooled = bool(cert_dev[1:].sum() > 0)
    if pooled:
        counts = counts + cert_counts
    levels = []
    for li, t in enumerate(taus):
        null = counts[li, 1:].astype(np.float64)
        m = float(null.mean())
        phi = max(1.0, float(null.var(ddof=1)) / m) if m >= 1 and K > 2 else 1.0
        lam_u = float(chi2.ppf(MOE_LAMBDA_CONF, 2 * int(null.sum()) + 2) / (2 * K))
        observed = int(counts[li, 0])
        p = _poisson_sf(observed / phi, lam_u / phi)
        levels.append({"tau": t, "legacy_count": observed, "draw_counts": null.astype(int).tolist(),
                       "rate_upper": lam_u, "overdispersion": phi, "p_value": p})
    p_min = min(lv["p_value"] for lv in levels) * len(levels)
    cert_fail = np.flatnonzero(cert0 & (score0 > 0)) if not pooled else np.zeros(0, np.int64)
    flagged = np.flatnonzero((score0 > taus[0]) & (~cert0 if not pooled else np.ones(n, dtype=bool)))
    flagged = flagged[np.argsort(-score0[flagged], kind="stable")]
    passed = len(cert_fail) == 0 and p_min >= alpha
    return MoEJudgement(passed, n, K, int(cert0.sum()), cert_fail, flagged, levels, min(1.0, p_min), pooled, alpha,
                        score0)


# ------------------------------------------------------------------------------------- comparisons
def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    both_nan = np.isnan(a) & np.isnan(b)
    return np.where(both_nan, 0.0, np.where(np.isnan(d), np.inf, d))


def diff_summary(a: np.ndarray, b: np.ndarray, tol: Tol, line_rows: np.ndarray, legacy_is: str = "a",
                 mask: np.ndarray | None = None) -> dict[str, Any]:
    """max / p99.9 of |a - b|, the rows beyond ``tol`` (relative to ``a``, the legacy side) and the worst rows."""
    d = _abs_diff(a, b)
    ok = tol.ok(b, a) if mask is None else (tol.ok(b, a) | ~mask)
    worst = np.argsort(-d, kind="stable")[:WORST_ROWS]
    return {
        "rows": int(len(a)),
        "max_abs_diff": float(d.max()) if len(d) else 0.0,
        "p999_abs_diff": float(np.quantile(d, 0.999)) if len(d) else 0.0,
        "mean_abs_diff": float(d.mean()) if len(d) else 0.0,
        "tolerance": tol.as_dict(),
        "rows_beyond_tolerance": int((~ok).sum()),
        "passed": bool(ok.all()),
        "worst_rows": [{"row": int(line_rows[i]), "legacy": _num(a[i]), "port": _num(b[i]), "diff": _num(b[i] - a[i])}
                       for i in worst],
        "_beyond": np.flatnonzero(~ok),
    }


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(s)
    y, s = y[keep], s[keep]
    if len(np.unique(y)) != 2:
        return None
    return float(roc_auc_score((y == y.max()).astype(int), s))


def percentile_table(scores: np.ndarray) -> np.ndarray:
    """The legacy table's values (``np.percentile(cali, 100 k / 1000)`` on float32 scores, k = 0..999)."""
    from .scoring import percentile_table as table

    return np.asarray([row[0] for row in table(np.asarray(scores, dtype=np.float32))], dtype=np.float64)


def operating_points(table: np.ndarray, source: str, ref: np.ndarray, port: np.ndarray, line_rows: np.ndarray,
                     legacy_file: np.ndarray | None = None) -> list[dict[str, Any]]:
    """For the top 0.1 / 0.5 / 1 / 5 % by the legacy percentile table: the threshold and the rows whose
    decision flips between the legacy model and the port (and between the legacy file and the port)."""
    out = []
    for q in OPERATING_POINTS:
        k = PERCENTILE_ROWS - round(q * PERCENTILE_ROWS)
        thr = float(table[k])
        a, b = ref >= thr, port >= thr
        flips = np.flatnonzero(a != b)
        entry = {"top": q, "threshold": thr, "threshold_from": f"{source} row {k} (percentile {k / 10:g})",
                 "legacy_flagged": int(a.sum()), "port_flagged": int(b.sum()), "flips": int(len(flips)),
                 "flip_rows": [int(line_rows[i]) for i in flips[:FLIP_ROWS_LISTED]]}
        if legacy_file is not None:
            c = legacy_file >= thr
            ff = np.flatnonzero(c != b)
            entry.update(legacy_file_flagged=int(c.sum()), legacy_file_flips=int(len(ff)),
                         legacy_file_flip_rows=[int(line_rows[i]) for i in ff[:FLIP_ROWS_LISTED]])
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------- models
@dataclass
class Models:
    kind: str
    reference: torch.nn.Module
    port: torch.nn.Module
    policies: dict[str, torch.nn.Module]  # deterministic MoE policies (MoE models with coin flips)
    coin_flips: bool


def build_models(hp: Any, legacy_sd: dict[str, torch.Tensor], source: str) -> Models:
    """The legacy model (``reference/``) and the port converted in memory, both in eval mode."""
    import reference

    from .config import DETERMINISTIC_POLICIES
    from .convert import ConvertError, build_module, legacy_to_lightning
    from .export import with_overrides

    kind = hp.kind
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference.build_model(kind, **hp.constructor_kwargs())
        try:
            ref.load_state_dict(legacy_sd, strict=True)
        except RuntimeError as e:
            raise VerifyError(f"{source}: the legacy model rejects the weights ({str(e).splitlines()[0]})") from None
        try:
            ckpt, _ = legacy_to_lightning(legacy_sd, hp.module_kwargs(), source=source)
        except ConvertError as e:
            raise VerifyError(str(e)) from None
        port = build_module(kind, ckpt["hyper_parameters"])
        port.load_state_dict(ckpt["state_dict"], strict=True)
        policies = {}
        if hp.uses_moe:
            policies = {p: with_overrides(port, moe_eval_policy=p) for p in DETERMINISTIC_POLICIES}
    return Models(kind, ref.eval(), port.eval(), policies, hp.uses_moe)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class SplitScores:
    reference: np.ndarray  # (n_slots,) legacy model, draw 0 seeds
    draws: np.ndarray  # (K, n_slots) port; draws[0] uses the legacy model's seeds
    policies: dict[str, np.ndarray]
    slots_scored: np.ndarray  # (n_slots,) bool


def _expected_dims(hp: Any) -> tuple[Any, str]:
    """The feature counts the model's hyperparameters fix, and where they come from (for the data reader)."""
    from .data import SplitDims

    want = SplitDims(n_cat=hp["n_cat_features"], n_num=hp["n_num_features"], seq_len=hp["seq_len"],
                     n_eng=hp["n_engineered_num_features"])
    keys = ("n_cat_features", "n_num_features", "seq_len", "n_engineered_num_features", "n_embedding")
    absent = [k for k in keys if k not in hp.explicit]
    where = f"the model's hyperparameters, {hp.source}" + (
        f"; absent there, so train.py's defaults: {', '.join(absent)}" if absent else "")
    return want, where


class SplitData:
    """One split read twice: by the legacy loader (for ``reference/``) and by :mod:`lightning_port.data` (port)."""

    def __init__(self, data_dir: Path, split: str, kind: str, version: str, hp: Any):
        from reference.training import LegacyDataset
        from reference.training import load_split as legacy_load_split

        from .data import DataError, TSANumpyDataset, load_split

        try:
            loaded = load_split(data_dir, split, kind, version, n_embedding=hp["n_embedding"],
                                n_num_features=hp["n_num_features"], expected=[_expected_dims(hp)])
        except DataError as e:
            raise VerifyError(str(e)) from None
        self.layout = loaded.layout
        self.files = loaded.files
        self.port = TSANumpyDataset(loaded, kind)
        # legacy side: the legacy reader of the same files (read-only map: the legacy's "r+" needs write access)
        self.legacy = LegacyDataset(legacy_load_split(data_dir, split, version, kind, layout=loaded.layout,
                                                      mmap_mode="r"))
        self.y = np.asarray(loaded.arrays["y"]).reshape(-1).astype(np.int64)
        self.n = len(self.y)

    def legacy_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        from torch.utils.data import default_collate

        return default_collate([self.legacy[int(i)] for i in rows])  # legacy DataLoader: one row at a time

    def port_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self.port.__getitems__(rows.tolist())


def _positive(scores: torch.Tensor) -> np.ndarray:
    return torch.softmax(scores.float(), dim=1)[:, -1].numpy().astype(np.float32)


def _forward_reference(model: torch.nn.Module, batch: dict, kind: str, seed: int) -> np.ndarray:
    from reference.training import model_inputs

    args, kwargs = model_inputs(batch, kind)
    torch.manual_seed(seed)
    return _positive(model(*args, **kwargs)[0])


def _forward_port(module: torch.nn.Module, batch: dict, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return _positive(module(*module.batch_to_args(batch))[0])


def score_split(models: Models, data: SplitData, plan: Plan, split_index: int, k_draws: int, base_seed: int,
                workdir: Path, progress: Callable[[int], None]) -> SplitScores:
    S = plan.n_slots
    ref = np.full(S, np.nan, np.float32)
    if k_draws * S * 4 > DRAWS_IN_MEMORY_BYTES:
        draws = np.lib.format.open_memmap(workdir / f"draws_{split_index}.npy", mode="w+", dtype=np.float32,
                                          shape=(k_draws, S))
        draws[:] = np.nan
    else:
        draws = np.full((k_draws, S), np.nan, np.float32)
    policies = {p: np.full(S, np.nan, np.float32) for p in models.policies}
    scored = np.zeros(S, dtype=bool)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in plan.batches:
            sl = slice(b.slot, b.slot + len(b.rows))
            lb, pb = data.legacy_batch(b.rows), data.port_batch(b.rows)
            s0 = _seed(base_seed, split_index, 0, b.rank, b.index)
            ref[sl] = _forward_reference(models.reference, lb, models.kind, s0)
            draws[0, sl] = _forward_port(models.port, pb, s0)
            for k in range(1, k_draws):
                draws[k, sl] = _forward_port(models.port, pb, _seed(base_seed, split_index, k, b.rank, b.index))
            for p, m in models.policies.items():
                policies[p][sl] = _forward_port(m, pb, s0)
            scored[sl] = True
            progress(1)
    return SplitScores(ref, draws, policies, scored)


def recheck_rows(models: Models, data: SplitData, plan: Plan, split_index: int, beyond_slots: np.ndarray,
                 base_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MoE with coin flips: re-score the batches holding rows beyond tolerance in comparison (1) with
    fresh seed pairs. A coin whose uniform draw lands within rounding of its keep threshold (g2 / 0.2)
    can fall either way when two fp32 implementations round g2 differently, moving that row's score;
    such a row agrees again under other seeds, a real difference does not. Returns the slots that
    agree under every recheck ("boundary") and those that do not ("persistent")."""
    hit = {b.rank * 10**9 + b.index: b for b in plan.batches
           if np.any((beyond_slots >= b.slot) & (beyond_slots < b.slot + len(b.rows)))}
    if len(hit) > MAX_RECHECK_BATCHES:
        return np.zeros(0, np.int64), beyond_slots
    agree = np.ones(len(beyond_slots), dtype=bool)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in hit.values():
            inside = (beyond_slots >= b.slot) & (beyond_slots < b.slot + len(b.rows))
            pos = beyond_slots[inside] - b.slot
            lb, pb = data.legacy_batch(b.rows), data.port_batch(b.rows)
            for r in range(1, RECHECK_SEEDS + 1):
                s = _seed(base_seed, split_index, 10**6 + r, b.rank, b.index)
                a = _forward_reference(models.reference, lb, models.kind, s)[pos]
                c = _forward_port(models.port, pb, s)[pos]
                agree[inside] &= MODEL_TOL.ok(c, a)
    return beyond_slots[agree], beyond_slots[~agree]


# ------------------------------------------------------------------------------------------- plots
def _plots(out: Path, split: str, labels: np.ndarray, ref: np.ndarray, port: np.ndarray,
           legacy_file: np.ndarray | None) -> list[str]:
    from .scoring import _figure, save_figure

    written = []
    rng = np.random.default_rng(0)
    # score-difference histogram
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    d = (port.astype(np.float64) - ref)[np.isfinite(port) & np.isfinite(ref)]
    e = None
    if legacy_file is not None:
        e = (port.astype(np.float64) - legacy_file)[np.isfinite(port) & np.isfinite(legacy_file)]
    lim = max([1e-7] + [float(np.abs(x).max()) for x in (d, e) if x is not None and len(x)])
    bins = np.linspace(-lim * 1.05, lim * 1.05, 81)  # common bins, symmetric; all-zero differences stay visible
    ax.hist(d, bins=bins, alpha=0.7, label=f"port - legacy model (max |d| {np.abs(d).max() if len(d) else 0:.2e})")
    if e is not None:
        ax.hist(e, bins=bins, alpha=0.5, label=f"port - legacy file (max |d| {np.abs(e).max() if len(e) else 0:.2e})")
    ax.set(xlabel="score difference", ylabel="rows", title=f"Score differences ({split}, {len(ref)} rows)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(save_figure(fig, out / f"{split}_score_diff_hist.png").name)
    # scatter (at most 200k points)
    fig = _figure(5.5, 5.5)
    ax = fig.subplots()
    idx = np.arange(len(ref)) if len(ref) <= 200_000 else rng.choice(len(ref), 200_000, replace=False)
    other, name = (legacy_file, "legacy file") if legacy_file is not None else (ref, "legacy model")
    ax.scatter(other[idx], port[idx], s=2, alpha=0.4)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel=f"{name} score", ylabel="port score", title=f"{name} vs port ({split})", xlim=(0, 1), ylim=(0, 1))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(save_figure(fig, out / f"{split}_scatter.png").name)
    # ROC of both
    from sklearn.metrics import roc_curve

    y = (labels == labels.max()).astype(int) if len(labels) else labels
    fig = _figure(5.5, 5.5)
    ax = fig.subplots()
    if len(np.unique(y)) == 2:
        series = [("legacy model", ref, "-"), ("port", port, "--")]
        if legacy_file is not None:
            series.append(("legacy file", legacy_file, ":"))
        for name, s, ls in series:
            keep = np.isfinite(s)
            fpr, tpr, _ = roc_curve(y[keep], s[keep])
            ax.plot(fpr, tpr, ls, lw=2, label=f"{name} (AUC {auc(y[keep], s[keep]):.4f})")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "one class only: no curve", ha="center")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=f"ROC ({split}, n={len(y)})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(save_figure(fig, out / f"{split}_roc.png").name)
    return written


# ------------------------------------------------------------------------------------------ training
TRAIN_PNG = "training_curves.png"
TRAIN_SPLITS = ("train", "vali", "cali")
# legacy reference.training.set_loss (what legacy_fit trains with): FocalLoss takes these defaults only
LEGACY_FIT_FOCAL = {"gamma": 2.0, "alpha": 0.25, "loss_reduction": "mean"}


def check_training_input(hp: Any, data_dir: Path, version: str, train_epochs: int) -> None:
    """Refuse ``--train-epochs`` before any work: a negative count, a loss the legacy loop of ``reference/``
    cannot train the way the job did, or splits the data reader rejects (a job without a train split)."""
    from .data import DataError, detect_layout

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
    from .data import DataError, layout_files, load_split

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
    import logging

    from parity.convergence import Protocol, convergence_figure, run_convergence

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
        convergence_figure([res]).savefig(_ensure(out) / TRAIN_PNG, dpi=90)
        section["plot"] = TRAIN_PNG
    return section


def _training_markdown(t: dict[str, Any]) -> list[str]:
    p = t["protocol"]
    lines = [f"## Training: up to {t['epochs_requested']} epoch(s) from the job's weights: "
             f"{'pass' if t['passed'] else 'FAIL'}", "",
             f"The legacy train.py loop (reference/) and Trainer.fit with legacy_selection, both starting from the "
             f"job's converted weights, on {t['data']} ({', '.join(f'{s} {n}' for s, n in t['rows'].items())} rows): "
             f"batch {p['batch_size']}, lr {p['lr']:g}, scheduler_maxlr {p['scheduler_maxlr']:g}, loss {p['loss']}, "
             f"patience {p['patience']}, max_epochs {p['max_epochs']}.", ""]
    lines += ["| comparison | values | worst abs error | worst rel error | tolerance at the last step (rtol / atol) | "
              "result |", "|---|---:|---:|---:|---|---|"]
    for name, c in t["comparisons"].items():
        tol = c["tolerance"]
        lines.append(f"| {name} | {c['values_compared']} | {_fmt(c['max_abs_err'])} | {_fmt(c['max_rel_err'])} | "
                     f"{tol['rtol']:.3g} / {tol['atol']:.3g} | {'pass' if c['passed'] else 'FAIL'} |")
    lines += ["", "| | legacy | port |", "|---|---:|---:|",
              f"| epochs trained | {t['epochs'][0]} | {t['epochs'][1]} |",
              f"| best epoch (0-based) | {_fmt(t['best_epoch'][0])} | {_fmt(t['best_epoch'][1])} |",
              f"| early stop raised after epoch | {_fmt(t['stop_epoch'][0])} | {_fmt(t['stop_epoch'][1])} |",
              f"| seconds per epoch (the side's whole run / epochs) | {t['seconds_per_epoch']['legacy']:.2f} | "
              f"{t['seconds_per_epoch']['port']:.2f} |",
              "", "| epoch | train loss legacy | train loss port | vali loss legacy | vali loss port | AUC legacy | "
              "AUC port |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for e in range(max(t["epochs"])):
        cells = [_fmt(t[key][side][e], ".8g") if e < len(t[key][side]) else "–"
                 for key in ("train_loss", "vali_loss", "auc_raw") for side in ("legacy", "port")]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in t["comparisons"].values():
        lines += [f"- {m}" for m in c["mismatches"][:3]]
    lines += [f"- {n}" for n in t["training_notes"]]
    if t["notes"]:
        lines.append(f"- {t['notes']}")
    lines.append("")
    if t["plot"]:
        lines += [f"![legacy loop vs Trainer.fit, per epoch]({t['plot']})", ""]
    return lines


# ------------------------------------------------------------------------------------------- options
@dataclass
class Options:
    source: str
    data_dir: str
    hparams: str | None = None
    split: str = "all"
    batch_size: int | None = None
    world_size: int | None = None
    epoch: int | None = None
    moe_seeds: int = DEFAULT_MOE_SEEDS
    rows: int | None = None
    out: str = "reports/verify"
    test_name: str | None = None
    seed: int = 0
    version: str = "v0"
    trust_pickle: bool = False
    file_atol: float | None = None
    progress: bool | None = None  # None: tqdm decides (off when stderr is not a terminal)
    plots: bool = True
    train_epochs: int = 0  # > 0: also the training comparison (legacy loop vs Trainer.fit) for up to N epochs


def _split_list(split: str) -> list[str]:
    if split == "all":
        return ["vali", "cali"]
    if split in SPLIT_FILES:
        return [split]
    raise VerifyError(f"--split {split!r}; expected vali, cali or all")


def _order_for_split(opts: Options, split: str, y: np.ndarray, tags: np.ndarray | None, tag_name: str,
                     max_epoch: int, notes: list[str]) -> tuple[int | None, int | None, str]:
    """(world, epoch, how the epoch was found) for one split."""
    if opts.world_size is None:
        return None, None, ""
    if opts.epoch is not None:
        return opts.world_size, opts.epoch, "--epoch"
    epochs = range(0, max_epoch + 2)
    if tags is None:
        notes.append(f"{split}: no {tag_name} to find the evaluation epoch and no --epoch: epoch 0 used (the "
                     "comparison with the legacy model does not depend on it)")
        return opts.world_size, 0, "default 0 (no tag file)"
    found = find_epochs(y, tags, opts.world_size, epochs)
    if len(found) == 1:
        return opts.world_size, found[0], f"{tag_name}"
    if not found:
        raise VerifyError(f"{tag_name}: its labels match the DistributedSampler order of world size "
                          f"{opts.world_size} at no epoch {epochs.start}..{epochs.stop - 1}; check --world-size (the "
                          "job's GPU count) and the data folder, or give --epoch")
    raise VerifyError(f"{tag_name}: its labels match the DistributedSampler order of world size {opts.world_size} at "
                      f"several epochs ({', '.join(map(str, found[:12]))}); give --epoch")


# --------------------------------------------------------------------------------------------- run
def run(opts: Options) -> dict[str, Any]:
    """Verify; returns the report (also written under ``opts.out``). Raises :class:`VerifyError` to refuse."""
    from .convert import ConvertError, load_file, split_legacy
    from .legacy_job import (
        LegacyJobError,
        check_state_dict,
        open_job,
        read_hyperparameters,
        read_percentile_table,
        read_score_file,
        read_tag_file,
    )

    started = time.time()
    if opts.batch_size is not None and opts.batch_size < 1:
        raise VerifyError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.world_size is not None and opts.world_size < 1:
        raise VerifyError(f"--world-size must be >= 1, got {opts.world_size}")
    if opts.epoch is not None and opts.epoch < 0:
        raise VerifyError(f"--epoch must be >= 0, got {opts.epoch}")
    if opts.epoch is not None and opts.world_size is None:
        raise VerifyError("--epoch applies to a multi-GPU job's DistributedSampler order: give --world-size too")
    if opts.rows is not None and opts.rows < 1:
        raise VerifyError(f"--rows must be >= 1, got {opts.rows}")
    if opts.train_epochs < 0:
        raise VerifyError(f"--train-epochs must be >= 0, got {opts.train_epochs}")
    if opts.file_atol is not None and not (0 <= opts.file_atol < 1):
        raise VerifyError(f"--file-atol must be in [0, 1), got {opts.file_atol}")
    splits = _split_list(opts.split)
    data_dir = Path(opts.data_dir)
    if not data_dir.is_dir():
        raise VerifyError(f"{data_dir}: no such data folder; expected the legacy numpy layout (flat, or SageMaker "
                          "channels vali/ and cali/)")
    out = Path(opts.out)
    file_tol = FILE_TOL if opts.file_atol is None else Tol(opts.file_atol, 0.0, "--file-atol (given by the user)")
    notes: list[str] = []
    reasons: list[str] = []

    with contextlib.ExitStack() as stack:
        try:
            job = stack.enter_context(open_job(opts.source, opts.hparams, opts.test_name))
            if job.hparams is None:
                raise VerifyError(f"{opts.source}: no hyperparameters.json inside or beside it; pass --hparams "
                                  "(SageMaker's hyperparameters.json of the job)")
            hp = read_hyperparameters(job.hparams)
            label = opts.source if job.source_kind == "file" else f"{opts.source}:{job.model_name}"
            legacy_sd, _training, fmt = split_legacy(load_file(job.model, opts.trust_pickle), label)
            check_state_dict(hp, legacy_sd, label)
            legacy_files = {n: p for n, p in job.outputs.items()}
            scores_in = {n: read_score_file(p) for n, p in legacy_files.items() if n.endswith("score_file.csv")}
            tags_in = {n: read_tag_file(p) for n, p in legacy_files.items() if n.endswith("tag_file.csv")}
            table_in = (read_percentile_table(legacy_files["percentile_score.pkl"], PERCENTILE_ROWS)
                        if "percentile_score.pkl" in legacy_files else None)
        except (LegacyJobError, ConvertError) as e:
            raise VerifyError(str(e)) from None
        notes += job.notes
        models = build_models(hp, legacy_sd, label)
        batch_size = opts.batch_size or hp["batch_size"]
        batch_from = "--batch-size" if opts.batch_size else (
            "batch_size " + ("from the hyperparameters" if "batch_size" in hp.explicit else "(train.py's default)"))
        k_draws = opts.moe_seeds if models.coin_flips else 1
        if models.coin_flips and k_draws < 2:
            raise VerifyError("--moe-seeds must be at least 2 for an MoE model with coin flips")
        workdir = Path(stack.enter_context(_private_dir()))
        check_training_input(hp, data_dir, opts.version, opts.train_epochs)

        datas = {s: SplitData(data_dir, s, hp.kind, opts.version, hp) for s in splits}
        plans: dict[str, Plan] = {}
        orders: dict[str, str] = {}
        for s in splits:
            score_name, tag_name = SPLIT_FILES[s]
            tags = tags_in.get(tag_name)
            if tags is not None and len(tags) != datas[s].n:
                raise VerifyError(f"{tag_name}: {len(tags)} labels; the {s} split has {datas[s].n} rows: not this "
                                  "split's file (or another data folder)")
            if score_name in scores_in and len(scores_in[score_name]) != datas[s].n:
                raise VerifyError(f"{score_name}: {len(scores_in[score_name])} scores; the {s} split has "
                                  f"{datas[s].n} rows: not this split's file (or another data folder)")
            world, epoch, how = _order_for_split(opts, s, datas[s].y, tags, tag_name, hp["max_epoch"], notes)
            plan = make_plan(datas[s].n, batch_size, world, epoch)
            if opts.rows is not None and opts.rows < datas[s].n:
                plan = plan.limited(opts.rows)
            plans[s] = plan
            orders[s] = plan.describe() + (f" (epoch from {how})" if how else "")

        total = sum(len(p.batches) for p in plans.values())
        progress = _progress(total, opts.progress)
        report_splits: dict[str, Any] = {}
        tables: dict[str, tuple[np.ndarray, str]] = {}
        if table_in is not None:
            tables["legacy"] = (table_in[:, 0], "percentile_score.pkl")
        # cali first: its table gives the vali operating points when the job has no percentile_score.pkl
        for i, s in sorted(enumerate(splits), key=lambda t: t[1] != "cali"):
            plan, data = plans[s], datas[s]
            sc = score_split(models, data, plan, i, k_draws, opts.seed, workdir, progress)
            n_lines = len(plan.line_rows)
            line_rows = plan.line_rows
            ref = sc.reference[:n_lines]
            port0 = np.asarray(sc.draws[0, :n_lines])
            labels = data.y[line_rows]
            entry: dict[str, Any] = {"rows": n_lines, "data_rows": data.n, "layout": data.layout, "order": orders[s],
                                     "batches": len(plan.batches)}
            # (1) legacy model vs port
            cmp1 = diff_summary(ref, port0, MODEL_TOL, line_rows)
            beyond = cmp1.pop("_beyond")
            if len(beyond) and models.coin_flips:
                boundary, persistent = recheck_rows(models, data, plan, i, beyond, opts.seed)
                cmp1["coin_boundary_rows"] = [int(line_rows[j]) for j in boundary]
                cmp1["rows_beyond_tolerance"] = int(len(persistent))
                cmp1["passed"] = len(persistent) == 0
                if len(boundary):
                    notes.append(f"{s}: {len(boundary)} row(s) differ between the legacy model and the port only under "
                                 "one seed and agree under fresh ones (coin flips at a rounding boundary): not counted")
            entry.update(cmp1)
            if not cmp1["passed"]:
                reasons.append(f"{s}: {cmp1['rows_beyond_tolerance']} row(s) where the port differs from the legacy "
                               f"model beyond tolerance (worst row {cmp1['worst_rows'][0]['row']}, "
                               f"|diff| {cmp1['max_abs_diff']:.3g})")
            # (2) the legacy job's own files
            score_name, tag_name = SPLIT_FILES[s]
            lf = scores_in.get(score_name)
            lf = lf[:n_lines] if lf is not None else None
            entry["auc"] = {"legacy": auc(labels, ref), "port": auc(labels, port0),
                            "legacy_file": auc(labels, lf) if lf is not None else None}
            if tag_name in tags_in:
                tags = tags_in[tag_name][:n_lines]
                bad = np.flatnonzero(tags != labels)
                tag_entry: dict[str, Any] = {"file": tag_name, "mismatches": int(len(bad)),
                                             "rows": [int(line_rows[j]) for j in bad[:WORST_ROWS]],
                                             "lines": [int(j) + 1 for j in bad[:WORST_ROWS]]}
                if len(bad):
                    hint = find_any_order(data.y, tags_in[tag_name], range(0, hp["max_epoch"] + 2))
                    if hint is not None:
                        w, e = hint
                        tag_entry["matching_order"] = "file order" if w is None else f"world size {w}, epoch {e}"
                    reasons.append(f"{s}: {tag_name} disagrees with the data labels in the claimed order "
                                   f"({plan.describe()}) on {len(bad)} line(s), first data row {int(line_rows[bad[0]])}"
                                   + (f"; the file matches {tag_entry['matching_order']}" if hint else ""))
                entry["tags"] = tag_entry
            if lf is not None:
                entry["legacy_file"] = _judge_file(lf, sc, n_lines, line_rows, models.coin_flips, file_tol, s,
                                                   score_name, reasons)
            # percentile table and operating points
            if s == "cali":
                regenerated = percentile_table(port0)
                tables.setdefault("legacy", (percentile_table(ref), "the legacy model's cali scores"))
                pt: dict[str, Any] = {"rows": PERCENTILE_ROWS, "legacy_source": tables["legacy"][1]}
                pt["max_abs_diff_port_vs_legacy"] = float(np.abs(regenerated - tables["legacy"][0]).max())
                pt["max_abs_diff_legacy_model_vs_legacy"] = float(np.abs(percentile_table(ref) - tables["legacy"][0]).max())
                if table_in is not None and "cali_score_file.csv" in scores_in and opts.rows is None:
                    from_file = percentile_table(scores_in["cali_score_file.csv"])
                    d = float(np.abs(from_file - table_in[:, 0]).max())
                    pt["legacy_file_consistent"] = bool(d <= 1e-6)
                    pt["max_abs_diff_pkl_vs_cali_score_file"] = d
                    if d > 1e-6:
                        reasons.append(f"percentile_score.pkl is not the table of cali_score_file.csv (max |diff| "
                                       f"{d:.3g})")
                if table_in is not None and not models.coin_flips and opts.rows is None:
                    pt["passed"] = pt["max_abs_diff_port_vs_legacy"] <= file_tol.atol
                    if not pt["passed"]:
                        reasons.append(f"cali: the port's percentile table differs from percentile_score.pkl by "
                                       f"{pt['max_abs_diff_port_vs_legacy']:.3g}")
                entry["percentile_table"] = pt
            table, table_src = tables.get("legacy", (percentile_table(ref), f"the legacy model's {s} scores"))
            entry["operating_points"] = operating_points(table, table_src, ref, port0, line_rows, lf)
            if models.coin_flips:
                entry["moe_policies"] = _policy_table(sc, n_lines, ref, table)
            entry["plots"] = _plots(_ensure(out), s, labels, ref, port0, lf) if opts.plots else []
            report_splits[s] = entry
        progress(0, close=True)
        training = (compare_training(opts, hp, legacy_sd, label, batch_size, batch_from, data_dir, out, workdir, reasons)
                    if opts.train_epochs else None)
    report_splits = {s: report_splits[s] for s in splits}

    n_params = sum(p.numel() for p in models.port.parameters())
    report = {
        "verdict": "pass" if not reasons else "fail",
        "reasons": reasons,
        "model": {"kind": hp.kind, "class": type(models.port).__name__,
                  "legacy_class": type(models.reference).__name__, "source": opts.source,
                  "source_kind": job.source_kind, "model_file": job.model_name, "legacy_format": fmt,
                  "parameters": int(n_params), "moe": bool(hp["use_moe"]), "coin_flips": models.coin_flips,
                  "hyperparameters_file": f"{job.hparams} ({job.hparams_where})",
                  "legacy_outputs": sorted(legacy_files), "other_files": job.extras},
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
    _write_reports(_ensure(out), report)
    return report


def _judge_file(lf: np.ndarray, sc: SplitScores, n_lines: int, line_rows: np.ndarray, coin_flips: bool, tol: Tol,
                split: str, name: str, reasons: list[str]) -> dict[str, Any]:
    port0 = np.asarray(sc.draws[0, :n_lines])
    if not coin_flips:
        res = diff_summary(lf, port0, tol, line_rows)
        beyond = res.pop("_beyond")
        res.update(file=name, criterion="row by row", criterion_detail="no coin flips: the scores are deterministic")
        if len(beyond):
            rows = ", ".join(str(int(line_rows[j])) for j in beyond[:8])
            reasons.append(f"{split}: {name} differs from the port beyond tolerance on {len(beyond)} row(s): data rows "
                           f"{rows}{', ...' if len(beyond) > 8 else ''}")
        return res
    draws = sc.draws[:, :n_lines]
    anchors = np.stack([sc.policies["all"][:n_lines], sc.policies["threshold"][:n_lines]])
    j = judge_moe(lf, draws, anchors, tol)
    med = np.median(np.asarray(draws, dtype=np.float64), axis=0)
    d = _abs_diff(lf, med.astype(np.float32))
    flagged = np.concatenate([j.certified_failures, j.exceed_rows])
    worst = flagged[:WORST_ROWS]
    res = {
        "file": name,
        "criterion": "MoE coin-flip envelope",
        "criterion_detail": "rows that do not depend on the coin flips row by row, the others by the leave-one-out "
                            "exceedance count (docs/verify.md)",
        "rows": int(n_lines),
        "max_abs_diff": float(d.max()) if n_lines else 0.0,
        "p999_abs_diff": float(np.quantile(d, 0.999)) if n_lines else 0.0,
        "diff_to": f"the median of {j.draws} port draws",
        "tolerance": tol.as_dict(),
        "passed": j.passed,
        "moe": j.as_dict(),
        "worst_rows": [{"row": int(line_rows[i]), "legacy": _num(lf[i]), "port": _num(med[i]), "diff": _num(lf[i] - med[i])}
                       for i in worst],
    }
    if len(j.certified_failures):
        rows = ", ".join(str(int(line_rows[i])) for i in j.certified_failures[:8])
        reasons.append(f"{split}: {name} differs from the port on {len(j.certified_failures)} row(s) whose score does "
                       f"not depend on the coin flips: data rows {rows}{', ...' if len(j.certified_failures) > 8 else ''}")
    if j.p_value < j.alpha:
        lv = j.deciding_level
        rows = ", ".join(str(int(line_rows[i])) for i in j.exceed_rows[:8])
        reasons.append(f"{split}: {name} lies beyond the port's coin-flip envelope by more than {lv['tau']:g} of its width "
                       f"on {lv['legacy_count']} row(s) (each port draw in its place: at most {max(lv['draw_counts'])}; "
                       f"p = {j.p_value:.2g} < {j.alpha:g}): data rows {rows}{', ...' if len(j.exceed_rows) > 8 else ''}")
    return res


def _policy_table(sc: SplitScores, n_lines: int, ref: np.ndarray, table: np.ndarray) -> list[dict[str, Any]]:
    """Deterministic MoE policies on this data: deviation from the legacy's average output (the mean
    of the port's coin-flip draws) and decision flips against the legacy model at each operating point."""
    mean = np.asarray(sc.draws[:, :n_lines], dtype=np.float64).mean(0)
    out = []
    for name, s in sc.policies.items():
        v = s[:n_lines].astype(np.float64)
        dev = np.abs(v - mean)
        flips = {}
        for q in OPERATING_POINTS:
            thr = table[PERCENTILE_ROWS - round(q * PERCENTILE_ROWS)]
            flips[str(q)] = int(((v >= thr) != (ref >= thr)).sum())
        out.append({"policy": name, "mean_abs_dev": float(dev.mean()), "p99_abs_dev": float(np.quantile(dev, 0.99)),
                    "max_abs_dev": float(dev.max()), "flips_vs_legacy_model": flips})
    return out


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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


# ----------------------------------------------------------------------------------------- reports
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _finite(o: Any) -> Any:
    """JSON has no NaN/inf: they become null (the markdown report says n/a)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _write_reports(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(render_markdown(report))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def render_markdown(r: dict[str, Any]) -> str:
    m, st = r["model"], r["settings"]
    lines = [f"# tsa-verify: {r['verdict'].upper()}", ""]
    if r["reasons"]:
        lines += ["Why it failed:", ""] + [f"- {x}" for x in r["reasons"]] + [""]
    lines += [
        f"Legacy job `{m['source']}` ({m['source_kind']}): model `{m['model_file']}` ({m['legacy_format']}), "
        f"{m['legacy_class']} -> {m['class']}, {m['parameters']:,} parameters, "
        + ("MoE with coin flips" if m["coin_flips"] else "MoE without coin flips (one expert)" if m["moe"] else "no MoE")
        + f". Hyperparameters: {m['hyperparameters_file']}; legacy outputs: {', '.join(m['legacy_outputs']) or 'none'}.",
        "",
        f"Data `{st['data_dir']}`, splits {', '.join(st['splits'])}; batch size {st['batch_size']} ({st['batch_size_from']})"
        + (f"; world size {st['world_size']}" if st["world_size"] else "")
        + (f"; {st['moe_seeds']} coin-flip draws of the port" if st["moe_seeds"] else "") + ".",
        "",
        "Tolerances: legacy model vs port: atol {atol} + rtol {rtol} ({reason}); legacy file vs port: atol {fatol} "
        "({freason}).".format(atol=st["tolerance_legacy_model"]["atol"], rtol=st["tolerance_legacy_model"]["rtol"],
                              reason=st["tolerance_legacy_model"]["reason"], fatol=st["tolerance_legacy_file"]["atol"],
                              freason=st["tolerance_legacy_file"]["reason"]),
        "",
    ]
    for name, s in r["splits"].items():
        lines += [f"## {name}: {s['rows']} rows", "", f"Order: {s['order']} ({s['batches']} batches, {s['layout']} "
                  "layout).", ""]
        lines += ["| comparison | rows | max abs diff | p99.9 abs diff | beyond tolerance | result |",
                  "|---|---:|---:|---:|---:|---|",
                  f"| legacy model vs port (same batches, same seeds) | {s['rows']} | {_fmt(s['max_abs_diff'])} | "
                  f"{_fmt(s['p999_abs_diff'])} | {s['rows_beyond_tolerance']} | {'pass' if s['passed'] else 'FAIL'} |"]
        lf = s.get("legacy_file")
        if lf:
            beyond = lf.get("rows_beyond_tolerance", lf.get("moe", {}).get("exceedances", 0))
            lines.append(f"| legacy file `{lf['file']}` vs port ({lf['criterion']}) | {lf['rows']} | "
                         f"{_fmt(lf['max_abs_diff'])} | {_fmt(lf['p999_abs_diff'])} | {beyond} | "
                         f"{'pass' if lf['passed'] else 'FAIL'} |")
        lines.append("")
        a = s["auc"]
        lines += [f"AUC: legacy model {_fmt(a['legacy'], '.6f')}, port {_fmt(a['port'], '.6f')}, legacy file "
                  f"{_fmt(a['legacy_file'], '.6f')}.", ""]
        if "tags" in s:
            t = s["tags"]
            lines += [f"Labels: `{t['file']}` matches the data labels in this order"
                      + (" on every line." if not t["mismatches"] else
                         f" EXCEPT {t['mismatches']} line(s) (data rows {t['rows'][:8]})"
                         + (f"; it matches {t['matching_order']}" if t.get("matching_order") else "") + "."), ""]
        if lf and "moe" in lf:
            j = lf["moe"]
            lines += [f"MoE criterion: {j['certified_rows']} rows do not depend on the coin flips (checked row by row: "
                      f"{j['certified_failures']} differ); on the other {j['stochastic_rows']} rows, rows beyond the port's "
                      f"coin-flip envelope by more than tau of its width (p = {_fmt(j['p_value'])}, alpha {j['alpha']}):", "",
                      "| tau | legacy file | each port draw in its place | rate bound | p |", "|---:|---:|---|---:|---:|"]
            lines += [f"| {lv['tau']:g} | {lv['legacy_count']} | {lv['draw_counts']} | {lv['rate_upper']:.3g} | "
                      f"{lv['p_value']:.3g} |" for lv in j["levels"]]
            lines.append("")
        if s.get("coin_boundary_rows"):
            lines += [f"Coin flips at a rounding boundary (differ under one seed only, agree under fresh ones): data rows "
                      f"{s['coin_boundary_rows'][:20]}.", ""]
        lines += ["Operating points (decision flips at the top q % by the legacy percentile table):", "",
                  "| top | threshold | legacy model flagged | port flagged | flips vs legacy model | flips vs legacy file |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for op in s["operating_points"]:
            lines.append(f"| {op['top'] * 100:g} % | {op['threshold']:.6g} | {op['legacy_flagged']} | {op['port_flagged']} | "
                         f"{op['flips']} | {op.get('legacy_file_flips', 'n/a')} |")
        lines += ["", f"Thresholds from {s['operating_points'][0]['threshold_from'].rsplit(' row', 1)[0]}.", ""]
        if "percentile_table" in s:
            p = s["percentile_table"]
            lines += [f"Percentile table (1000 rows) regenerated from the port's cali scores vs {p['legacy_source']}: "
                      f"max |diff| {_fmt(p['max_abs_diff_port_vs_legacy'])}; the legacy model's: "
                      f"{_fmt(p['max_abs_diff_legacy_model_vs_legacy'])}"
                      + (f"; percentile_score.pkl vs the table of cali_score_file.csv: "
                         f"{_fmt(p['max_abs_diff_pkl_vs_cali_score_file'])}" if "max_abs_diff_pkl_vs_cali_score_file" in p
                         else "") + ".", ""]
        if "moe_policies" in s:
            lines += ["Deterministic MoE policies on this data (deviation from the mean of the port's coin-flip draws; "
                      "flips against the legacy model):", "",
                      "| policy | mean abs dev | p99 abs dev | max abs dev | flips top 0.1 / 0.5 / 1 / 5 % |",
                      "|---|---:|---:|---:|---|"]
            for p in s["moe_policies"]:
                f = p["flips_vs_legacy_model"]
                lines.append(f"| {p['policy']} | {p['mean_abs_dev']:.3g} | {p['p99_abs_dev']:.3g} | {p['max_abs_dev']:.3g} | "
                             + " / ".join(str(f[str(q)]) for q in OPERATING_POINTS) + " |")
            lines.append("")
        lines += ["Worst rows, legacy model vs port (row = data row in file order):", "",
                  "| row | legacy | port | diff |", "|---:|---:|---:|---:|"]
        lines += [f"| {w['row']} | {_fmt(w['legacy'], '.8g')} | {_fmt(w['port'], '.8g')} | {_fmt(w['diff'], '.3g')} |"
                  for w in s["worst_rows"][:10]]
        if lf:
            lines += ["", f"Worst rows, legacy file vs port ({'vs the median of the draws' if 'moe' in lf else 'row by row'}):",
                      "", "| row | legacy file | port | diff |", "|---:|---:|---:|---:|"]
            lines += [f"| {w['row']} | {_fmt(w['legacy'], '.8g')} | {_fmt(w['port'], '.8g')} | {_fmt(w['diff'], '.3g')} |"
                      for w in lf["worst_rows"][:10]]
        if s["plots"]:
            lines += ["", " ".join(f"![{p}]({p})" for p in s["plots"])]
        lines.append("")
    if r.get("training"):
        lines += _training_markdown(r["training"])
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += [f"{r['seconds']} s, torch {r['torch']}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Prove the port equal to a legacy SageMaker job: its model, its data, its score files.",
        epilog="Exit codes: 0 pass, 1 beyond tolerance (see report.md), 2 refused (one line on stderr).")
    p.add_argument("source", help="model.tar.gz, the job's model folder, or a legacy model file")
    p.add_argument("--data-dir", required=True, help="the data the job read: SageMaker channels DATA/vali/, DATA/cali/ "
                                                     "or a flat folder of {split}_..._v0.npy files")
    p.add_argument("--hparams", help="the job's hyperparameters.json (default: inside or beside SOURCE)")
    p.add_argument("--split", default="all", choices=("vali", "cali", "all"), help="splits to verify (default all)")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the job's batch_size, 1024 if absent)")
    p.add_argument("--world-size", type=int, help="the job's GPU count: its score files are in DistributedSampler order")
    p.add_argument("--epoch", type=int, help="with --world-size: the evaluation epoch (default: found from tag_file.csv)")
    p.add_argument("--moe-seeds", type=int, default=DEFAULT_MOE_SEEDS,
                   help=f"MoE models with coin flips: port draws with fresh seeds (default {DEFAULT_MOE_SEEDS})")
    p.add_argument("--rows", type=int, help="verify only the first N lines of each split (in the legacy order); with "
                                            "--train-epochs also train on the first N rows of train / vali / cali "
                                            "(a laptop-sized run)")
    p.add_argument("--train-epochs", type=int, default=0, metavar="N",
                   help="after the scoring proof, fine-tune the job's model for up to N epochs with the legacy train.py "
                        "loop (reference/) and with Trainer.fit (legacy_selection), same data order and seeds, the "
                        "job's batch_size / lr / scheduler_maxlr / loss / patience (OneCycleLR over N epochs), and "
                        "compare them epoch by epoch (default 0: off)")
    p.add_argument("--out", default="reports/verify", help="folder for report.md, report.json and PNGs")
    p.add_argument("--test-name", help="picks {test_name}.pt in SOURCE (default: test_name from the hyperparameters)")
    p.add_argument("--seed", type=int, default=0, help="base seed of verify's coin flips (default 0)")
    p.add_argument("--version", default="v0", help="version tag in the data file names (default v0)")
    p.add_argument("--file-atol", type=float,
                   help=f"tolerance for the legacy files (default {FILE_TOL.atol}; widen only with a reason, e.g. a job "
                        "that scored under autocast; the report records it)")
    p.add_argument("--trust-pickle", action="store_true", help="load the model with weights_only=False (runs code: "
                                                              "trusted files only)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNGs (report.md and report.json only)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--requests" or a.startswith("--requests=") for a in argv):  # the shadow comparison (issue 19)
        from parity.shadow import main as shadow_main

        return shadow_main(argv, prog=prog)
    args = build_parser(prog).parse_args(argv)
    opts = Options(source=args.source, data_dir=args.data_dir, hparams=args.hparams, split=args.split,
                   batch_size=args.batch_size, world_size=args.world_size, epoch=args.epoch, moe_seeds=args.moe_seeds,
                   rows=args.rows, out=args.out, test_name=args.test_name, seed=args.seed, version=args.version,
                   trust_pickle=args.trust_pickle, file_atol=args.file_atol,
                   progress=False if args.no_progress else None, plots=not args.no_plots,
                   train_epochs=args.train_epochs)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        report = run(opts)
    except VerifyError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # never a traceback for a user; TSA_VERIFY_DEBUG=1 re-raises
        if os.environ.get("TSA_VERIFY_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{PROG}: error: internal error ({type(e).__name__}: {msg}); rerun with TSA_VERIFY_DEBUG=1 for details",
              file=sys.stderr)
        return EXIT_REFUSED
    out = Path(opts.out)
    for name, s in report["splits"].items():
        lf = s.get("legacy_file")
        extra = ""
        if lf and "moe" in lf:
            j = lf["moe"]
            extra = (f"; legacy file (coin flips): {j['certified_failures']} of {j['certified_rows']} flip-free rows "
                     f"differ, {j['exceedances']} rows beyond the draws' envelope, p = {j['p_value']:.2g} "
                     f"({'pass' if lf['passed'] else 'FAIL'})")
        elif lf:
            extra = f"; legacy file: max |diff| {lf['max_abs_diff']:.3g} ({'pass' if lf['passed'] else 'FAIL'})"
        print(f"{name}: {s['rows']} rows; legacy model vs port: max |diff| {s['max_abs_diff']:.3g}, "
              f"{s['rows_beyond_tolerance']} beyond tolerance{extra}")
    t = report.get("training")
    if t:
        stops = " / ".join("none" if e is None else str(e) for e in t["stop_epoch"])
        print(f"training: {t['epochs'][0]} epoch(s) legacy / {t['epochs'][1]} port, best epoch {t['best_epoch'][0]} / "
              f"{t['best_epoch'][1]}, early stop raised after epoch {stops}, max |score diff| "
              f"{t['max_port_score_diff']:.3g}, {len(t['comparisons']) - len(t['failed'])} of {len(t['comparisons'])} "
              f"comparisons within tolerance ({'pass' if t['passed'] else 'FAIL'})")
    for reason in report["reasons"]:
        print(f"FAIL: {reason}")
    print(f"{PROG}: {report['verdict'].upper()}: wrote {out / 'report.md'}, {out / 'report.json'}")
    return EXIT_PASS if report["verdict"] == "pass" else EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
