"""The legacy endpoint's post-processing of a raw score (legacy-tsa.md §15; semantics and every
assumption in docs/serving.md): :func:`percentile_score` looks the raw score up in the 1000-row
``percentile_score.pkl`` table, :func:`probability_score` is the logistic of the B-spline calibration
of ``bspline_parameters.json``. Both take scalars or numpy arrays. ``tsa-score --percentiles
percentile_score.pkl [--calibration bspline_parameters.json]`` (:mod:`lightning_port.serving.score`)
writes them next to the legacy score.

``percentile_score.pkl`` is read by :func:`lightning_port.legacy_files.load_percentile_rows` (the
project's one restricted unpickler: numpy float scalars only, never code) and validated by
:class:`PercentileTable`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..legacy_files import PERCENTILE_ROWS, load_percentile_rows

__all__ = [
    "LOGIT_CAP",
    "PERCENTILE_ROWS",
    "BSplineCalibration",
    "PercentileTable",
    "load_calibration",
    "load_percentile_table",
    "percentile_score",
    "probability_score",
]

LOGIT_CAP = 25.0  # legacy: "1 above 25" -- a spline value (logit) above 25 gives probability exactly 1


# --- the endpoint's post-processing ------------------------------------------------------------------
@dataclass(frozen=True)
class PercentileTable:
    """A validated percentile table: ``scores`` non-decreasing, ``percentiles`` strictly increasing in
    [0, 1], both float64, one entry per row of ``percentile_score.pkl``."""

    scores: np.ndarray
    percentiles: np.ndarray

    @classmethod
    def from_rows(cls, rows: Any, source: str = "percentile table") -> PercentileTable:
        """From ``[[score, percentile], ...]`` (a list as the legacy pickles it, or an (N, 2) array);
        ``ValueError`` (one line, naming ``source``) unless it is 1000 rows of two finite numbers with
        scores non-decreasing and percentiles strictly increasing within [0, 1]."""
        if isinstance(rows, PercentileTable):
            return rows
        if isinstance(rows, np.ndarray):
            arr = rows
        else:
            if not isinstance(rows, (list, tuple)):
                raise ValueError(f"{source}: expected a list of [score, percentile] rows, got {type(rows).__name__}")
            for i, row in enumerate(rows):
                if (not isinstance(row, (list, tuple, np.ndarray)) or len(row) != 2
                        or not all(_is_real(v) for v in row)):
                    raise ValueError(f"{source}: row {i} is {_short(row)}, expected [score, percentile] (two numbers)")
            arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), 2) if rows else np.zeros((0, 2))
        if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{source}: expected {PERCENTILE_ROWS} rows of [score, percentile], got an array "
                             f"of shape {arr.shape}")
        arr = arr.astype(np.float64)
        if arr.shape[0] != PERCENTILE_ROWS:
            raise ValueError(f"{source}: expected {PERCENTILE_ROWS} rows of [score, percentile] (the legacy table), "
                             f"got {arr.shape[0]}")
        scores, pct = arr[:, 0].copy(), arr[:, 1].copy()
        if not np.isfinite(arr).all():
            i = int(np.argmin(np.isfinite(arr).all(axis=1)))
            raise ValueError(f"{source}: row {i} is not finite ({_short([float(v) for v in arr[i]])})")
        if (np.diff(scores) < 0).any():
            i = int(np.argmax(np.diff(scores) < 0)) + 1
            raise ValueError(f"{source}: scores must be non-decreasing, but row {i} ({float(scores[i])!r}) is below "
                             f"row {i - 1} ({float(scores[i - 1])!r})")
        if (np.diff(pct) <= 0).any():
            i = int(np.argmax(np.diff(pct) <= 0)) + 1
            raise ValueError(f"{source}: percentiles must be strictly increasing, but row {i} ({float(pct[i])!r}) is "
                             f"not above row {i - 1} ({float(pct[i - 1])!r})")
        if pct[0] < 0 or pct[-1] > 1:
            raise ValueError(f"{source}: percentiles must lie in [0, 1], got {float(pct[0])!r} .. {float(pct[-1])!r}")
        scores.flags.writeable = False
        pct.flags.writeable = False
        return cls(scores, pct)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_percentile_table(path: str | Path) -> PercentileTable:
    """Read and validate a legacy ``percentile_score.pkl`` with the restricted unpickler of
    :func:`lightning_port.legacy_files.load_percentile_rows` (numpy float scalars only: never
    ``pickle.load`` on a user's file); ``ValueError`` with a one-line message."""
    path = Path(path)
    return PercentileTable.from_rows(load_percentile_rows(path), f"percentile table {path}")


@dataclass(frozen=True)
class BSplineCalibration:
    """A validated B-spline (``knots`` t, ``coefficients`` c, ``degree`` k) in scipy/FITPACK's convention:
    s(x) = Σ_j c_j B_{j,k}(x) over the n = len(t) - k - 1 basis functions of the knot vector t."""

    knots: np.ndarray
    coefficients: np.ndarray  # the n used (FITPACK pads c to len(t) with zeros; extras are dropped)
    degree: int

    @classmethod
    def from_dict(cls, params: Any, source: str = "calibration") -> BSplineCalibration:
        """From the dict of ``bspline_parameters.json``; ``ValueError`` (one line, naming ``source`` and the
        key) unless ``degree`` is an integer >= 0, ``knots`` a non-decreasing list of at least 2·(degree + 1)
        finite numbers with no value repeated more than degree + 1 times and t[k] < t[n], and
        ``coefficients`` a list of n..len(knots) finite numbers."""
        if isinstance(params, BSplineCalibration):
            return params
        if not isinstance(params, Mapping):
            raise ValueError(f"{source}: expected a JSON object with keys knots, coefficients, degree, "
                             f"got {type(params).__name__}")
        for key in ("knots", "coefficients", "degree"):
            if key not in params:
                raise ValueError(f"{source}: missing key {key!r} (expected knots, coefficients, degree)")
        k = params["degree"]
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise ValueError(f"{source}: 'degree' must be an integer >= 0, got {_short(params['degree'])}")
        k = int(k)
        t = _real_vector(params["knots"], f"{source}: 'knots'")
        c = _real_vector(params["coefficients"], f"{source}: 'coefficients'")
        if t.size < 2 * (k + 1):
            raise ValueError(f"{source}: 'knots' needs at least 2·(degree + 1) = {2 * (k + 1)} values for degree {k}, "
                             f"got {t.size}")
        if (np.diff(t) < 0).any():
            i = int(np.argmax(np.diff(t) < 0)) + 1
            raise ValueError(f"{source}: 'knots' must be non-decreasing, but knots[{i}] = {float(t[i])!r} < "
                             f"knots[{i - 1}] = {float(t[i - 1])!r}")
        values, counts = np.unique(t, return_counts=True)
        if counts.max() > k + 1:
            v = float(values[int(np.argmax(counts))])
            raise ValueError(f"{source}: knot {v!r} is repeated {int(counts.max())} times; at most degree + 1 = {k + 1} "
                             "(more makes the basis degenerate)")
        n = t.size - k - 1
        if not t[k] < t[n]:
            raise ValueError(f"{source}: 'knots' give an empty base interval [knots[{k}], knots[{n}]] = "
                             f"[{float(t[k])!r}, {float(t[n])!r}]")
        if not n <= c.size <= t.size:
            raise ValueError(f"{source}: 'coefficients' must have len(knots) - degree - 1 = {n} values (up to "
                             f"len(knots) = {t.size} with FITPACK's zero padding), got {c.size}")
        c = c[:n].copy()
        t.flags.writeable = False
        c.flags.writeable = False
        return cls(t, c, k)

    def __call__(self, x: Any) -> np.ndarray:
        """s(x) for finite ``x`` (any shape) by de Boor's algorithm. Outside the base interval
        [t_k, t_n] the polynomial of the nearest non-empty knot interval is continued (extrapolation, as
        ``scipy.interpolate.splev(x, tck)`` / ``BSpline(t, c, k)`` do by default); at a knot the interval
        to its right is used (right-continuous), and at t_n the last one."""
        t, c, k = self.knots, self.coefficients, self.degree
        x = np.asarray(x, dtype=np.float64)
        n = c.size
        starts = np.flatnonzero(t[k:n] < t[k + 1: n + 1]) + k  # non-empty intervals [t_i, t_i+1), k <= i < n
        pos = np.searchsorted(t[starts], x, side="right") - 1
        i = starts[np.clip(pos, 0, starts.size - 1)]  # (x.shape) interval index
        d = np.stack([c[i - k + j] for j in range(k + 1)])  # (k+1, ...) the coefficients acting on it
        for r in range(1, k + 1):
            for j in range(k, r - 1, -1):
                left, right = t[i - k + j], t[i + 1 + j - r]
                alpha = (x - left) / (right - left)  # right > left: the interval is non-empty
                d[j] = (1.0 - alpha) * d[j - 1] + alpha * d[j]
        return d[k]


def _real_vector(v: Any, what: str) -> np.ndarray:
    if not isinstance(v, (list, tuple, np.ndarray)) or (not isinstance(v, np.ndarray) and not all(_is_real(e) for e in v)):
        raise ValueError(f"{what} must be a list of numbers, got {_short(v)}")
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a flat list of numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} holds a non-finite value at index {int(np.argmin(np.isfinite(arr)))}")
    return arr


def load_calibration(path: str | Path) -> BSplineCalibration:
    """Read and validate ``bspline_parameters.json`` (``ValueError`` with a one-line message)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration {path} does not exist")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration {path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    return BSplineCalibration.from_dict(params, f"calibration {path}")


def _scores(raw_score: Any) -> tuple[np.ndarray, bool]:
    x = np.asarray(raw_score, dtype=np.float64)
    return x, x.ndim == 0


def _edges(x: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The legacy edge rules on top of ``inside`` (the value for 0 < x < 1): 0 at or below 0, 1 at or above
    1, NaN for NaN."""
    out = np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, inside))
    return np.where(np.isnan(x), np.nan, out)


def percentile_score(raw_score: Any, table: Any) -> Any:
    """The legacy endpoint's ``score-percentile`` of a raw score (softmax[1]) in ``table``
    (:class:`PercentileTable`, or the rows of ``percentile_score.pkl`` as a list / (1000, 2) array).

    Legacy binary search with its edge rules, and these choices where the legacy text is silent
    (docs/serving.md): 0 at or below 0; 1 at or above 1; otherwise the percentile of the first row whose
    score is >= the raw score -- the row itself on an exact match, the next row's percentile between
    two rows, row 0's (0.0) below the first row, 1 above the last row (the "next row" after row 999 is
    the 100th percentile). Among rows with equal scores the first (lowest percentile) is used, so the
    result does not depend on where a binary search happens to land. NaN gives NaN.
    Vectorised: an array in gives a float64 array of its shape; a scalar in gives a Python float.
    """
    tab = PercentileTable.from_rows(table)
    x, scalar = _scores(raw_score)
    idx = np.searchsorted(tab.scores, x, side="left")  # rows with score < x
    inside = np.where(idx < tab.scores.size, tab.percentiles[np.minimum(idx, tab.scores.size - 1)], 1.0)
    out = _edges(x, inside)
    return float(out) if scalar else out


def _logistic(s: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(s))  # no overflow for either sign
    return np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def probability_score(raw_score: Any, calibration: Any) -> Any:
    """The legacy endpoint's ``ProbabilityScore``: the logistic of the calibration B-spline at the raw score.

    ``calibration``: :class:`BSplineCalibration` or the dict of ``bspline_parameters.json`` (``knots``,
    ``coefficients``, ``degree``). With s = spline(raw score), computed in float64: exactly 1 where s > 25
    (the legacy "1 above 25": 25 is a logit, logistic(25) = 1 - 1.4e-11), else 1 / (1 + exp(-s));
    the spline is extrapolated outside its knots (as scipy's ``splev`` does by default). Edge rules as
    :func:`percentile_score`: 0 at or below 0, 1 at or above 1, NaN for NaN. Vectorised like it.
    """
    spline = BSplineCalibration.from_dict(calibration)
    x, scalar = _scores(raw_score)
    inside = np.zeros_like(x)
    interior = (x > 0) & (x < 1)
    if interior.any():
        s = spline(x[interior])
        inside[interior] = np.where(s > LOGIT_CAP, 1.0, _logistic(s))
    out = _edges(x, inside)
    return float(out) if scalar else out
