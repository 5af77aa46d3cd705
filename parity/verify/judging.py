"""Judging the port against the legacy job: row by row under the named tolerances of
:mod:`parity.tolerances` with :func:`parity.compare.within` (the harness's elementwise rule), the legacy
files (the MoE criterion of :mod:`.moe` where coin flips decide), the labels, the percentile table, AUCs
and the decisions at the operating points."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lightning_port.legacy_files import PERCENTILE_ROWS, output_names
from lightning_port.legacy_files import percentile_table as legacy_percentile_table

from ..compare import abs_diff, within
from ..tolerances import USER_FILE_ATOL_REASON, Tolerance, tolerance_for
from .moe import FILE_TOL, judge_moe
from .options import SPLITS, Options

# (1) the legacy model vs the port: the same CPU, the same fp32 function computed by two implementations
MODEL_TOL = tolerance_for("verify.legacy_model")
# (2) the legacy job's own files (FILE_TOL, tolerance "verify.legacy_file"): scored on its GPU; exact float32
# values (str(np.float32(v)))
PKL_TOL = tolerance_for("verify.percentile_pkl")  # percentile_score.pkl vs the table of cali_score_file.csv
SPLIT_FILES = {s: (output_names(s)["scores"], output_names(s)["tags"]) for s in SPLITS}
OPERATING_POINTS = (0.001, 0.005, 0.01, 0.05)  # top 0.1 / 0.5 / 1 / 5 % by the legacy percentile table
WORST_ROWS = 20
FLIP_ROWS_LISTED = 20


def file_tolerance(opts: Options) -> Tolerance:
    """The legacy files' tolerance: :data:`FILE_TOL`, or ``--file-atol`` (the report records it)."""
    return FILE_TOL if opts.file_atol is None else Tolerance(0.0, opts.file_atol, USER_FILE_ATOL_REASON)


def diff_summary(a: np.ndarray, b: np.ndarray, tol: Tolerance, line_rows: np.ndarray,
                 mask: np.ndarray | None = None) -> dict[str, Any]:
    """max / p99.9 of |a - b|, the rows beyond ``tol`` (relative to ``a``, the legacy side) and the worst rows."""
    d = abs_diff(b, a)
    ok = within(b, a, tol) if mask is None else (within(b, a, tol) | ~mask)
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
    return np.asarray([row[0] for row in legacy_percentile_table(np.asarray(scores, dtype=np.float32))],
                      dtype=np.float64)


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


def judge_file(lf: np.ndarray, sc: Any, n_lines: int, line_rows: np.ndarray, coin_flips: bool, tol: Tolerance,
               split: str, name: str, reasons: list[str]) -> dict[str, Any]:
    """The legacy job's score file against the port: row by row, or by the MoE criterion when coin flips decide
    (``sc``: the split's :class:`~parity.verify.scoring.SplitScores`)."""
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
    d = abs_diff(med.astype(np.float32), lf)
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


def policy_table(sc: Any, n_lines: int, ref: np.ndarray, table: np.ndarray) -> list[dict[str, Any]]:
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
