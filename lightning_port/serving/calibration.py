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

import bisect
import json
import math
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

    def __post_init__(self) -> None:
        # Python floats for the scalar search (one request at a time: no numpy call per lookup)
        object.__setattr__(self, "_score_list", self.scores.tolist())
        object.__setattr__(self, "_pct_list", self.percentiles.tolist())

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
    s(x) = Σ_j c_j B_{j,k}(x) over the n = len(t) - k - 1 basis functions of the knot vector t, evaluated
    as the legacy handler's ``scipy.interpolate.BSpline(t, c, k, extrapolate=False)``: NaN outside the
    base interval [t_k, t_n] (no extrapolation) and for NaN, bit for bit scipy's arithmetic inside it
    (legacy-endpoint.md §6.2)."""

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
        coef = params["coefficients"]
        if isinstance(coef, (list, tuple, dict)) and len(coef) == 0:
            status = params.get("status")
            raise ValueError(f"{source}: 'coefficients' is empty" + (f" (status {status!r})" if status is not None else "")
                             + ": the R calibration job that wrote it failed, and the legacy handler cannot build "
                             "its spline from it either")
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "_knot_list", self.knots.tolist())
        object.__setattr__(self, "_coef_list", self.coefficients.tolist())

    def __call__(self, x: Any) -> np.ndarray:
        """s(x) for ``x`` of any shape (float64): NaN outside [t_k, t_n] and for NaN. Inside, the interval
        index l is the largest in [k, n - 1] with t_l <= x (so t_n uses l = n - 1) and the k + 1 non-zero
        basis values come from the Cox-de Boor triangle in scipy's order of operations (``_deBoor_D``),
        summed against the coefficients in increasing order from 0.0: every element is computed by the same
        float64 operations as :meth:`value` (bit-identical), which are scipy's (tests)."""
        t, c, k = self.knots, self.coefficients, self.degree
        x = np.asarray(x, dtype=np.float64)
        n = c.size
        inside = (x >= t[k]) & (x <= t[n])  # False for NaN
        xs = np.where(inside, x, t[k])  # a harmless point for the lanes outside (their result is NaN)
        lo = np.clip(np.searchsorted(t, xs, side="right") - 1, k, n - 1)  # (x.shape) interval index
        h = [np.ones_like(xs)] + [np.zeros_like(xs) for _ in range(k)]
        for j in range(1, k + 1):
            hh = [h[m].copy() for m in range(j)]
            h[0] = np.zeros_like(xs)
            for m in range(1, j + 1):
                xb, xa = t[lo + m], t[lo + m - j]
                same = xb == xa
                w = hh[m - 1] / np.where(same, 1.0, xb - xa)
                h[m - 1] = np.where(same, h[m - 1], h[m - 1] + w * (xb - xs))
                h[m] = np.where(same, 0.0, w * (xs - xa))
        z = np.zeros_like(xs)
        for q in range(k + 1):
            z = z + c[lo + q - k] * h[q]
        return np.where(inside, z, np.nan)

    def value(self, x: float) -> float:
        """s(x) for one float, in plain Python floats (the serving path; same operations as :meth:`__call__`)."""
        t, c, k = self._knot_list, self._coef_list, self.degree
        n = len(c)
        if not t[k] <= x <= t[n]:  # also NaN
            return math.nan
        lo = min(max(bisect.bisect_right(t, x) - 1, k), n - 1)
        h = [1.0] + [0.0] * k
        for j in range(1, k + 1):
            hh = h[:j]
            h[0] = 0.0
            for m in range(1, j + 1):
                xb, xa = t[lo + m], t[lo + m - j]
                if xb == xa:
                    h[m] = 0.0
                    continue
                w = hh[m - 1] / (xb - xa)
                h[m - 1] += w * (xb - x)
                h[m] = w * (x - xa)
        z = 0.0
        for q in range(k + 1):
            z += c[lo + q - k] * h[q]
        return z


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


def _is_scalar(raw_score: Any) -> bool:
    return isinstance(raw_score, (int, float, np.integer, np.floating)) or (
        isinstance(raw_score, np.ndarray) and raw_score.ndim == 0)


def _percentile_row(x: float, scores: list[float]) -> int:
    """The legacy binary search (legacy-endpoint.md §6.1), literally: the row of an equal score where the
    search meets one, else the final ``hi`` (the number of rows below x minus 1; -1 below the first row,
    and for NaN, where every comparison is false)."""
    lo, hi = 0, len(scores) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        s = scores[mid]
        if s == x:
            return mid
        if s < x:
            lo = mid + 1
        else:
            hi = mid - 1
    return hi


def _percentile_rows(x: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """:func:`_percentile_row` for every element of ``x`` at once: the same search path per element (the
    same midpoints, stopping at the same equal row), run as masked array steps."""
    n = scores.size
    lo = np.zeros(x.shape, dtype=np.int64)
    hi = np.full(x.shape, n - 1, dtype=np.int64)
    found = np.full(x.shape, -2, dtype=np.int64)
    active = lo <= hi
    while active.any():
        mid = (lo + hi) // 2
        s = scores[np.clip(mid, 0, n - 1)]
        eq = active & (s == x)
        found = np.where(eq, mid, found)
        go = active & ~eq
        less = go & (s < x)
        lo = np.where(less, mid + 1, lo)
        hi = np.where(go & ~less, mid - 1, hi)
        active = go & (lo <= hi)
    return np.where(found >= -1, found, hi)


def percentile_score(raw_score: Any, table: Any) -> Any:
    """The legacy endpoint's ``score-percentile`` of a raw score (softmax[1]) in ``table``
    (:class:`PercentileTable`, or the rows of ``percentile_score.pkl`` as a list / (1000, 2) array).

    The legacy rule (legacy-endpoint.md §6.1): the integer 0 at or below 0 and the integer 1 at or above 1;
    otherwise the legacy binary search gives a row r (an equal score's row where the search meets one,
    which among tied rows depends on the search path; else the number of rows below x minus 1) and the
    answer is the percentile of row r + 1 -- the NEXT row on an exact match -- or of the last row when r
    is the last row. So below the first row: row 0's percentile (0.0, a float); above the last row: the
    last row's (0.999, not 1); NaN: row 0's. Comparisons in float64.
    A scalar in gives the legacy's Python value (int 0 / int 1 / the table's float); an array in gives a
    float64 array of its shape, element for element the scalar search's value (bit-identical).
    """
    tab = PercentileTable.from_rows(table)
    if _is_scalar(raw_score):
        x = raw_score.item() if isinstance(raw_score, (np.generic, np.ndarray)) else raw_score
        if x <= 0:
            return 0
        if x >= 1:
            return 1
        pct = tab._pct_list
        r = _percentile_row(float(x), tab._score_list)
        return pct[-1] if r == len(pct) - 1 else pct[r + 1]
    x = np.asarray(raw_score, dtype=np.float64)
    r = _percentile_rows(x, tab.scores)
    last = tab.scores.size - 1
    inside = tab.percentiles[np.where(r == last, last, r + 1)]
    return np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, inside))


def probability_score(raw_score: Any, calibration: Any) -> Any:
    """The legacy endpoint's ``ProbabilityScore``: the logistic of the calibration B-spline at the raw score.

    ``calibration``: :class:`BSplineCalibration` or the dict of ``bspline_parameters.json`` (``knots``,
    ``coefficients``, ``degree``). The legacy rule (legacy-endpoint.md §6.2): the integer 0 at or below 0
    and the integer 1 at or above 1; otherwise z = spline(x) in float64 (NaN outside the knots' base
    interval: no extrapolation); the integer 1 where z > 25 (strictly); else e^z / (e^z + 1) as written,
    with numpy's float64 exp -- NaN for NaN z, no lower clamp (very negative z gives 0.0).
    A scalar in gives the legacy's Python value (int 0 / int 1 / float); an array in gives a float64 array.
    """
    spline = BSplineCalibration.from_dict(calibration)
    if _is_scalar(raw_score):
        x = raw_score.item() if isinstance(raw_score, (np.generic, np.ndarray)) else raw_score
        if x <= 0:
            return 0
        if x >= 1:
            return 1
        z = spline.value(float(x))
        if z > LOGIT_CAP:
            return 1
        e = float(np.exp(z))
        return e / (e + 1)
    x = np.asarray(raw_score, dtype=np.float64)
    z = spline(x)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(z)
        inside = np.where(z > LOGIT_CAP, 1.0, e / (e + 1))
    return np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, inside))
