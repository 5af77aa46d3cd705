"""``tsa-score``: score a split in the legacy numpy layout with an exported ONNX model (ONNX Runtime)
or a port checkpoint (eager), and write the legacy score files.

``tsa-score MODEL.onnx|CKPT --data-dir D --split vali --out DIR`` writes, as the legacy loop did
(formats in :mod:`lightning_port.scoring`):

- ``vali``: ``score_file.csv`` (softmax[:, -1], one ``str(np.float32(v))`` per line) and ``tag_file.csv``;
- ``cali``: ``cali_score_file.csv``, ``cali_tag_file.csv`` and ``percentile_score.pkl``;
- any other split ``S``: ``S_score_file.csv`` and ``S_tag_file.csv``.

Rows are scored in file order in batches of ``--batch-size`` (ONNX models have a dynamic batch
axis; ``--batch-size 1`` reproduces the online handler exactly, since with MoE a row's score
depends on the rows sharing its batch unless the model was trained/exported ``batch_invariant``).
Eager scoring uses the checkpoint's ``moe_eval_policy`` unless ``--moe-eval-policy`` names another.

The legacy endpoint's post-processing (legacy-tsa.md §15; semantics and every assumption in
docs/serving.md): :func:`percentile_score` looks the raw score up in the 1000-row
``percentile_score.pkl`` table, :func:`probability_score` is the logistic of the B-spline calibration
of ``bspline_parameters.json``. ``tsa-score --percentiles percentile_score.pkl [--calibration
bspline_parameters.json]`` writes them, next to the legacy score, to ``endpoint_scores.csv``
(``{split}_endpoint_scores.csv`` for other splits than ``vali``) with the endpoint's JSON keys as header:
``legacy-score,score-percentile,ProbabilityScore``. The legacy score files stay byte-identical.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .export import (
    DUAL_INPUTS,
    SINGLE_INPUTS,
    ExportError,
    eager_outputs,
    load_checkpoint,
    ort_session,
    run_onnx,
)

PROG = "tsa-score"
DEFAULT_BATCH = 1024
PERCENTILE_ROWS = 1000  # legacy: [np.percentile(cali, 100 * k / 1000), k / 1000] for k = 0..999
LOGIT_CAP = 25.0  # legacy: "1 above 25" -- a spline value (logit) above 25 gives probability exactly 1
ENDPOINT_COLUMNS = ("legacy-score", "score-percentile", "ProbabilityScore")  # the endpoint's JSON keys


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


class _TableUnpickler(pickle.Unpickler):
    """Reads ``percentile_score.pkl`` without running code: the only globals allowed are the two numpy
    needs to rebuild a float scalar (``numpy.dtype`` for ``f4`` / ``f8`` and the scalar constructor, under
    numpy 1's and numpy 2's module names) and, for protocol-2 files, ``_codecs.encode`` (how protocol 2
    spells the scalar's 4 or 8 bytes), each replaced by a checking wrapper."""

    SCALAR = {("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.SCALAR:
            return _float_scalar
        if (module, name) == ("numpy", "dtype"):
            return _float_dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a percentile table does not need "
                                     "(only numpy float scalars are allowed)")


_FLOAT_DTYPES = {"f4", "f8", "<f4", "<f8", ">f4", ">f8", "=f4", "=f8"}


def _float_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if not isinstance(spec, str) or spec not in _FLOAT_DTYPES:
        raise pickle.UnpicklingError(f"it holds a numpy scalar of dtype {_short(spec)}; only float32/float64 are "
                                     "allowed")
    return np.dtype(spec, copy=True)  # a copy: BUILD then sets its state, never on numpy's shared descriptor


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or len(text) > 8:
        raise pickle.UnpicklingError("it encodes something other than a float scalar's bytes")
    return text.encode("latin1")


def _float_scalar(dtype: Any, data: Any = None) -> np.floating:
    if not isinstance(dtype, np.dtype) or dtype.kind != "f" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("it holds a numpy scalar that is not a float32/float64 value")
    return np.frombuffer(data, dtype=dtype)[0]


def load_percentile_table(path: str | Path) -> PercentileTable:
    """Read and validate a legacy ``percentile_score.pkl`` with a restricted unpickler (numpy float
    scalars only: never ``pickle.load`` on a user's file); ``ValueError`` with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"percentile table {path} does not exist")
    try:
        with open(path, "rb") as f:
            rows = _TableUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"percentile table {path}: not loaded: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line, no traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"percentile table {path}: not a pickled table ({first})") from None
    return PercentileTable.from_rows(rows, f"percentile table {path}")


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

Scorer = Callable[[Mapping[str, Tensor]], np.ndarray]  # named inputs -> probs (B, C)


class ModelInfo:
    """What the scorer needs to know about a model: its kind and feature counts."""

    def __init__(self, kind: str, hparams: Mapping[str, Any]):
        self.kind = kind
        self.hparams = dict(hparams)

    @property
    def n_engineered(self) -> int:
        return int(self.hparams.get("n_engineered_num_features", 0))


def onnx_scorer(path: str | Path, threads: int = 1) -> tuple[Scorer, ModelInfo]:
    """An ONNX Runtime scorer for an exported file (kind and hyperparameters from its metadata)."""
    from .export import read_metadata

    meta = read_metadata(path)
    session = ort_session(path, threads=threads, metadata=meta)
    names = {i.name for i in session.get_inputs()}
    kind = meta.get("kind") or ("dual" if "x_seq_cat_cid" in names else "single")
    hparams = json.loads(meta.get("hyperparameters", "{}"))

    def score(inputs: Mapping[str, Tensor]) -> np.ndarray:
        return run_onnx(session, inputs)["probs"]

    return score, ModelInfo(kind, hparams)


def eager_scorer(module: torch.nn.Module) -> tuple[Scorer, ModelInfo]:
    """An eager scorer for a port LightningModule (eval mode, its own MoE policy)."""
    module = module.eval()

    def score(inputs: Mapping[str, Tensor]) -> np.ndarray:
        return eager_outputs(module, inputs)["probs"]

    return score, ModelInfo(module.kind, module.hparams)


def batch_to_inputs(batch: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """A :class:`~lightning_port.data.TSANumpyDataset` batch -> named model inputs (legacy forward names)."""
    from .module import key_padding_mask

    out: dict[str, Tensor] = {}
    if kind == "single":
        out.update(x_cat=batch["x_seq_cat"], x_num=batch["x_seq_num"], time_seq=batch["time_to_last"],
                   key_padding_mask=key_padding_mask(batch["not_padded"]))
    else:
        for s in ("_cid", "_ccid"):
            out.update({f"x_seq_cat{s}": batch[f"x_seq_cat{s}"], f"x_seq_num{s}": batch[f"x_seq_num{s}"],
                        f"time_seq{s}": batch[f"time_to_last{s}"],
                        f"key_padding_mask{s}": key_padding_mask(batch[f"not_padded{s}"])})
    out["x_engineered"] = batch["x_engineered_num"]
    names = SINGLE_INPUTS if kind == "single" else DUAL_INPUTS
    return {n: out[n] for n in names}


def output_names(split: str) -> dict[str, str]:
    """Legacy file names for a split's scores, tags (and percentile table for ``cali``), and the name of
    the endpoint-columns file (``endpoint``, written only with ``--percentiles`` / ``--calibration``)."""
    if split == "vali":
        return {"scores": "score_file.csv", "tags": "tag_file.csv", "endpoint": "endpoint_scores.csv"}
    if split == "cali":
        return {"scores": "cali_score_file.csv", "tags": "cali_tag_file.csv", "percentiles": "percentile_score.pkl",
                "endpoint": "cali_endpoint_scores.csv"}
    return {"scores": f"{split}_score_file.csv", "tags": f"{split}_tag_file.csv",
            "endpoint": f"{split}_endpoint_scores.csv"}


def write_endpoint_file(path: str | Path, scores: np.ndarray, table: PercentileTable | None = None,
                        calibration: BSplineCalibration | None = None) -> Path:
    """CSV with the endpoint's keys as header: ``legacy-score`` (as in ``score_file.csv``), then
    ``score-percentile`` (with a table) and ``ProbabilityScore`` (with a calibration), one row per score,
    the derived values as Python's shortest round-trip ``repr`` of the float64 result."""
    path = Path(path)
    cols = [ENDPOINT_COLUMNS[0]]
    values: list[np.ndarray] = []
    if table is not None:
        cols.append(ENDPOINT_COLUMNS[1])
        values.append(np.atleast_1d(percentile_score(scores, table)))
    if calibration is not None:
        cols.append(ENDPOINT_COLUMNS[2])
        values.append(np.atleast_1d(probability_score(scores, calibration)))
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        for i, v in enumerate(scores):
            f.write(",".join([str(np.float32(v)), *(repr(float(col[i])) for col in values)]) + "\n")
    return path


def score_split(scorer: Scorer, info: ModelInfo, data_dir: str | Path, split: str, out_dir: str | Path,
                *, batch_size: int = DEFAULT_BATCH, version: str = "v0", table: PercentileTable | None = None,
                calibration: BSplineCalibration | None = None) -> dict[str, Path]:
    """Score every row of ``split`` in file order and write the legacy files (and, with ``table`` and/or
    ``calibration``, the endpoint columns file); returns their paths."""
    from .data import SplitDims, TSANumpyDataset, load_split
    from .scoring import positive_scores, write_percentile_table, write_score_file, write_tag_file

    hp = info.hparams
    want = SplitDims(n_cat=hp.get("n_cat_features"), n_num=hp.get("n_num_features"),
                     seq_len=hp.get("seq_len"), n_eng=hp.get("n_engineered_num_features"))
    loaded = load_split(data_dir, split, info.kind, version, n_embedding=hp.get("n_embedding"),
                        n_num_features=hp.get("n_num_features"), expected=[(want, "the model")])
    dataset = TSANumpyDataset(loaded, info.kind)
    n = len(dataset)
    probs, labels = [], []
    for start in range(0, n, batch_size):
        batch = dataset.__getitems__(list(range(start, min(start + batch_size, n))))
        probs.append(positive_scores(scorer(batch_to_inputs(batch, info.kind))))
        labels.append(batch["y"].numpy())
    scores = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    tags = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(split)
    written = {"scores": write_score_file(out_dir / names["scores"], scores),
               "tags": write_tag_file(out_dir / names["tags"], tags)}
    if "percentiles" in names and scores.size:
        written["percentiles"] = write_percentile_table(out_dir / names["percentiles"], scores)
    if table is not None or calibration is not None:
        written["endpoint"] = write_endpoint_file(out_dir / names["endpoint"], scores, table, calibration)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Score a legacy numpy split with an ONNX model "
                                "(ONNX Runtime) or a port checkpoint (eager) and write the legacy score files.")
    p.add_argument("model", help="MODEL.onnx (from tsa-export-onnx) or a port Lightning checkpoint")
    p.add_argument("--data-dir", required=True, help="folder with the legacy {split}_X_..._{version}.npy files")
    p.add_argument("--split", default="vali", help="vali (score_file.csv), cali (cali_*, percentile_score.pkl) or another")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--version", default="v0", help="file version tag (default v0)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"rows per batch (default {DEFAULT_BATCH})")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch intra-op threads (default 1)")
    p.add_argument("--moe-eval-policy", default=None, help="eager only: override the checkpoint's MoE eval policy")
    p.add_argument("--percentiles", default=None, metavar="PKL",
                   help="legacy percentile_score.pkl: add the endpoint's score-percentile column "
                        "(written with the legacy score to endpoint_scores.csv)")
    p.add_argument("--calibration", default=None, metavar="JSON",
                   help="bspline_parameters.json (knots, coefficients, degree): add the endpoint's ProbabilityScore")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size must be >= 1, got {args.batch_size}.")
        path = Path(args.model)
        if not path.is_file():
            raise ExportError(f"model {path} does not exist.")
        table = load_percentile_table(args.percentiles) if args.percentiles else None
        calibration = load_calibration(args.calibration) if args.calibration else None
        if path.suffix == ".onnx":
            if args.moe_eval_policy:
                raise ExportError("--moe-eval-policy applies to checkpoints; an ONNX model's policy is fixed "
                                  "at export (see its moe_eval_policy metadata).")
            scorer, info = onnx_scorer(path, threads=args.threads)
            engine = "onnxruntime"
        else:
            torch.set_num_threads(args.threads)
            overrides = {"moe_eval_policy": args.moe_eval_policy} if args.moe_eval_policy else {}
            scorer, info = eager_scorer(load_checkpoint(path, **overrides))
            engine = "eager"
        written = score_split(scorer, info, args.data_dir, args.split, args.out, batch_size=args.batch_size,
                              version=args.version, table=table, calibration=calibration)
    except (ExportError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    n = len(written["scores"].read_text().splitlines())
    print(f"scored {n} rows of {args.split} ({info.kind}, {engine}, batch {args.batch_size}): "
          + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
