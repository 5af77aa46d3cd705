"""A request dict -> the model's inputs, as the legacy handler's ``data_parsing`` (legacy-endpoint.md §2-§3).

Plain Python over the request with column plans computed once per model (:class:`RequestPlan`): values are
parsed, default-filled, mapped and scaled in float64 where the legacy is float64, and cast to float32 only
when the model inputs are assembled. The legacy built numpy string arrays for the same steps; the port
reproduces what those did, observable quirks included:

- the steps run in the legacy's order, so a request fails at the first step the legacy failed at, with the
  legacy's exception type and message (the numpy texts too: ``could not convert string to float:
  np.str_('abc')`` where the legacy's array held strings; Python's ``'abc'`` where a ``null`` made it an
  object array, in which JSON booleans also parse as 1.0 / 0.0);
- a sanity failure (not a dict, a missing key, an order date more than 1e7 before the current one) is a
  :class:`SanityFailure`, which ``predict_fn`` answers with -1;
- an embedding index out of range is found here and raised where the legacy model raised it (after every
  data_parsing check: a request that also fails the date check answers -1).

Where the legacy's description leaves the order of two failures in different places of one request open,
the port reports them in this order: the type and key checks; per numerical categorical (in
``numerical_cat_vars_indices`` order) the current value, then its history; the two no-history keys' split;
the history columns (categorical, then numerical; per column: split, truncation, default filling), their
element counts per group, the alignment; the current rows (categorical, numerical, dense: default filling,
then lists); categorical mapping and integer parsing (column by column, each column oldest row first and
the current order last), the 50-row limit; numerical parsing (the same order), the date check; dense
parsing (left to right); the embedding range.

Personal data: the legacy printed the whole request on every warning and failure. The port logs one line
per event on the ``lightning_port.serving`` logger with the reason and a summary that carries no value of
the request (key count, history lengths).

``strict=True`` (off by default) refuses what the legacy scored silently wrong (docs/serving.md, "Strict
mode"; docs/divergences.md): misaligned histories, immature histories, a blank/NaN current order date or a
future-dated history, sanity failures (a :class:`StrictRefusal` instead of -1); and keeps the newest 50 rows
of a longer history instead of crashing.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, NamedTuple

import numpy as np

from .artifacts import OBJECT_ID, ModelFolder

logger = logging.getLogger("lightning_port.serving")

BLANKS = ("", "My Text String")  # exact, case-sensitive: "My text String" is not blank
NUMCAT_CURRENT_EXEMPT = ("", "My Text String", "false")  # the history's only exemption is ""
CURRENT = "CURRENT"  # legacy: request["objectId"] is overwritten with this before the key checks
DATE_LIMIT = 1e7  # legacy: a time-to-current above this (strictly) fails the sanity check
INT64 = (-(2**63), 2**63)
NUMPY_STR_INTS = (-(2**63), 2**64)  # numpy keeps ints in this range in a string array; others make it object

# the legacy's sanity-failure log lines, without "Sanity check failed. "
NOT_A_DICT = "Input data is not a dict obj."
MISSING_KEY = "Input data does not contain required key in {}."
BAD_ORDER_DATE = "Sequence OTF recorded wrong orderDate."
# the legacy's warning lines, without "Sanity check warning. "
NOT_MATURED = "Input data OTF not matured. Lengths of two batches not matched."
MISMATCH = "Input data OTFs have mismatch length. Use only currently order for evaluation."
# numpy's and torch's messages, as the legacy raised them
INHOMOGENEOUS = ("setting an array element with a sequence. The requested array has an inhomogeneous shape "
                 "after 1 dimensions. The detected shape was ({},) + inhomogeneous part.")
NEGATIVE_PADDING = "index can't contain negative values"
INDEX_OUT_OF_RANGE = "index out of range in self"
TOO_LARGE_FOR_INT64 = "Python int too large to convert to C long"


class LegacyRequestError(Exception):
    """The legacy handler raised ``error`` on this request (a builtin exception with the legacy's type and
    message): in ``data_parsing``, or in the model for an embedding index out of range. ``predict_fn``
    re-raises ``error``; the HTTP server answers 422 with it."""

    def __init__(self, error: BaseException, stage: str = "predict_fn"):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.stage = stage


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def redacted(exc: BaseException) -> str:
    """``Type: message`` for the log, with every quoted text (a request value, or a variable name) replaced by
    ``<value>``: the legacy's messages carry the offending value, which may be personal data."""
    return f"{type(getattr(exc, 'error', exc)).__name__}: {_QUOTED.sub('<value>', str(getattr(exc, 'error', exc)))}"


class StrictRefusal(ValueError):
    """``strict=True`` refused a request that the legacy handler would have scored (or answered -1)."""


class SanityFailure(NamedTuple):
    """The legacy's sanity failure (``predict_fn`` returns -1); ``reason`` is its log line."""

    reason: str


# ONNX / forward input name -> ModelInputs attribute
INPUTS_ORDER = (("x_cat", "x_cat"), ("x_num", "x_num"), ("x_engineered", "x_engineered"), ("time_seq", "time_seq"),
                ("key_padding_mask", "key_padding_mask"))


@dataclass
class ModelInputs:
    """One request's model inputs (no batch axis), float32 as the legacy model received them."""

    x_cat: np.ndarray  # (L, n_cat) embedding rows, left-padded with 0
    x_num: np.ndarray  # (L, n_num) scaled numericals, padding rows 0
    time_seq: np.ndarray  # (L, 1) current order date minus each row's, padding 0
    key_padding_mask: np.ndarray  # (L + 1,) bool: True on padding rows, False on real rows and the last slot
    x_engineered: np.ndarray  # (n_dense,) scaled dense numericals
    history_rows: int
    warnings: tuple[str, ...] = ()


class _Missing:
    def __repr__(self) -> str:
        return "<no default>"


MISSING = _Missing()


def _text(v: Any) -> str:
    """A categorical cell as the legacy's numpy string array held it."""
    return v if v.__class__ is str else ("None" if v is None else str(v))


def _makes_object_array(v: Any) -> bool:
    c = v.__class__
    return v is None or c is dict or (c is int and not NUMPY_STR_INTS[0] <= v < NUMPY_STR_INTS[1])


def _float_in_str_array(v: Any) -> float:
    """numpy's str -> float64 cast of a string array's cell (the JSON value as numpy wrote it into the array)."""
    c = v.__class__
    if c is str:
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"could not convert string to float: np.str_({v!r})") from None
    if c is bool:
        raise ValueError(f"could not convert string to float: np.str_('{v}')")
    return float(v)  # int / float: their text parses back to the same value


def _float_in_object_array(v: Any) -> float:
    """numpy's object -> float64 cast: None is NaN, everything else float(v) with Python's messages."""
    return math.nan if v is None else float(v)


def _int_in_str_array(t: str) -> int:
    """numpy's str -> int64 cast of a categorical cell (after the "None" -> "0" rule)."""
    if t == "None":
        return 0
    try:
        v = int(t)
    except ValueError:
        raise ValueError(f"invalid literal for int() with base 10: np.str_({t!r})") from None
    if not INT64[0] <= v < INT64[1]:
        raise OverflowError(TOO_LARGE_FOR_INT64)
    return v


def _parse_floats(values: list, object_mode: bool, exact: bool = False) -> list[float]:
    """The cells as float64 (numpy's cast of the legacy's string or object array). ``exact``: a cell may be
    a JSON boolean, which ``float`` would accept but a string array refuses."""
    if not object_mode:
        if not exact:
            try:
                return list(map(float, values))  # the common case: every cell a valid number or numeric string
            except (ValueError, TypeError):
                pass
        return [_float_in_str_array(v) for v in values]  # raises the first bad cell's numpy message
    return [_float_in_object_array(v) for v in values]


_NUMCAT_CACHE: dict[str, str] = {"": ""}  # history element -> str(int(float(x))) (successful ones only)
_NUMCAT_CACHE_LIMIT = 200_000


def _numcat_history(seq: list[str]) -> list[str]:
    """Every element but "" as str(int(float(x))), raising at the first element that fails (in order)."""
    cache = _NUMCAT_CACHE
    try:
        return list(map(cache.__getitem__, seq))
    except KeyError:
        pass
    if len(cache) > _NUMCAT_CACHE_LIMIT:
        cache.clear()
        cache[""] = ""
    out = []
    for x in seq:
        y = cache.get(x)
        if y is None:
            y = cache[x] = str(int(float(x)))
        out.append(y)
    return out


class RequestPlan:
    """The column plans of one model folder, and :meth:`parse` (the legacy ``data_parsing``)."""

    def __init__(self, folder: ModelFolder, strict: bool = False):
        f = folder.features
        self.strict = bool(strict)
        self.sep = f.sep
        self.seq_len = f.seq_len
        self.max_history = f.seq_len - 1
        self.n_rows = folder.n_embedding_rows
        d = folder.defaults
        self.key_checks = []
        for group, keys in (("input_data_seq_cat_otf_vars", f.cat_otf), ("input_data_seq_cat_vars", f.input_cat),
                            ("input_data_seq_num_otf_vars", f.num_otf), ("input_data_seq_num_vars", f.input_num),
                            ("input_data_dense_num_vars", f.input_dense)):
            self.key_checks.append((MISSING_KEY.format(group), frozenset(k for k in keys if k != OBJECT_ID)))
        self.flag_keys = f.no_history_keys
        self.numcat = tuple((f.seq_cat_vars[i], f.cat_otf[i]) for i in f.numcat_indices)
        # categorical: 110 history keys / current keys (features + orderDate + objectId), defaults by base name
        self.cat_otf, self.cat_keys = f.cat_otf, f.input_cat
        self.cat_defaults = tuple(d.get(k, MISSING) for k in f.input_cat)
        self.cat_maps = folder.cat_maps  # (n_cat,) dict or None
        self.n_cat = len(f.seq_cat_vars)
        self.num_otf, self.num_keys = f.num_otf, f.input_num
        self.num_defaults = tuple(d.get(k, MISSING) for k in f.input_num)
        self.num_bool_defaults = {j for j, v in enumerate(self.num_defaults) if v.__class__ is bool}
        self.numcat_positions = tuple(f.numcat_indices)  # positions of the numcat keys in the current cat row
        self.n_num = len(f.seq_num_vars)
        self.dense_keys = f.input_dense
        self.dense_defaults = tuple(d.get(k, MISSING) for k in f.input_dense)
        self.n_dense = len(f.dense_num_vars)
        s = folder.scalers
        self.num_scale, self.num_min = s.seq_num_scale, s.seq_num_min
        self.static_scale, self.static_min = s.static_scale, s.static_min

    # --- steps -------------------------------------------------------------------------------------
    def _fill_row(self, row: list, keys: tuple[str, ...], defaults: tuple) -> tuple[bool, bool]:
        """Blank cells -> the variable's default (KeyError for a variable without one); then a JSON list
        anywhere makes numpy's row array fail (ValueError). Returns (object array, holds a boolean)."""
        if row.count("") or row.count("My Text String"):
            for j, v in enumerate(row):
                if v.__class__ is str and v in BLANKS:
                    dv = defaults[j]
                    if dv is MISSING:
                        raise KeyError(keys[j])
                    row[j] = dv
        types = set(map(type, row))
        if list in types:
            raise ValueError(INHOMOGENEOUS.format(len(row)))
        obj = type(None) in types or dict in types or (int in types and any(map(_makes_object_array, row)))
        return obj, bool in types

    def _history(self, data: dict, otf_keys: tuple[str, ...], base_keys: tuple[str, ...], defaults: tuple,
                 normalised: dict, truncate: int | None) -> tuple[list[list], bool, set[int]]:
        """The history columns of one group (split, truncated to the newest ``truncate`` elements, blanks
        default-filled); ValueError when their element counts differ (numpy's ragged array). Also returns
        whether a non-string default made the legacy's array an object array, and the columns holding a
        non-string default."""
        cols = []
        object_mode = False
        filled: set[int] = set()  # columns holding a default that is not a string
        sep = self.sep
        for j, key in enumerate(otf_keys):
            seq = normalised.get(key)
            if seq is None:
                seq = data[key].split(sep)
            if truncate is not None:
                seq = seq[-truncate:]
            if "" in seq or "My Text String" in seq:
                dv = defaults[j]
                if dv is MISSING:
                    raise KeyError(base_keys[j])
                seq = [dv if x in BLANKS else x for x in seq]
                if dv.__class__ is not str:
                    filled.add(j)
                    object_mode = object_mode or _makes_object_array(dv)
            cols.append(seq)
        if len({len(c) for c in cols}) > 1:
            raise ValueError(INHOMOGENEOUS.format(len(cols)))
        return cols, object_mode, filled

    def parse(self, data: Any) -> ModelInputs | SanityFailure:
        """The legacy ``data_parsing`` of a parsed JSON body. Returns the model inputs or a sanity failure;
        raises :class:`LegacyRequestError` (wrapping the legacy's exception) or, with ``strict``,
        :class:`StrictRefusal`. The request is not modified."""
        try:
            return self._parse(data)
        except LegacyRequestError:
            raise
        except StrictRefusal:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise LegacyRequestError(exc) from None

    def _fail(self, reason: str, summary: str) -> SanityFailure:
        if self.strict:
            raise StrictRefusal(f"strict: sanity check failed: {reason}")
        if logger.isEnabledFor(logging.WARNING):
            logger.warning("sanity check failed: %s (%s); answering -1", reason, summary)
        return SanityFailure(reason)

    def _parse(self, data: Any) -> ModelInputs | SanityFailure:
        if not isinstance(data, dict):
            return self._fail(NOT_A_DICT, f"a JSON {type(data).__name__}")
        keys = data.keys()
        for reason, need in self.key_checks:
            if not keys >= need:
                return self._fail(reason, f"{len(data)} keys, {len(need - keys)} of this list missing")
        sep = self.sep
        f1, f2 = self.flag_keys
        v1, v2 = data[f1], data[f2]
        no_history = (v1.__class__ is str and v1 in BLANKS) or (v2.__class__ is str and v2 in BLANKS)
        # numerical categoricals: int(float(x)) as text (current value unless "", "My Text String" or "false";
        # every history element but "")
        current: dict[str, Any] = {}
        normalised: dict[str, list] = {}
        for cur_key, otf_key in self.numcat:
            v = data[cur_key]
            if v not in NUMCAT_CURRENT_EXEMPT:
                v = _NUMCAT_CACHE.get(v) or str(int(float(v))) if v.__class__ is str else str(int(float(v)))
            current[cur_key] = v
            if not no_history:
                normalised[otf_key] = _numcat_history(data[otf_key].split(sep))
        # the two no-history keys decide the truncation ("OTF not matured")
        n1 = len(normalised[f1]) if f1 in normalised else len(v1.split(sep))
        n2 = len(normalised[f2]) if f2 in normalised else len(v2.split(sep))
        warnings = []
        truncate = None
        if n1 != n2:
            warnings.append(NOT_MATURED)
            if not no_history and self.strict:
                raise StrictRefusal(f"strict: the two no-history keys have {n1} and {n2} history elements; the "
                                    "legacy would truncate every history to the newest "
                                    f"{min(n1, n2)} (it assumes the missing ones are the oldest)")
            truncate = min(n1, n2)
        cat_hist: list[list] = []
        num_hist: list[list] = []
        num_object = False
        cat_filled: set[int] = set()
        num_filled: set[int] = set()
        if not no_history:
            cat_hist, _, cat_filled = self._history(data, self.cat_otf, self.cat_keys, self.cat_defaults, normalised,
                                                    truncate)
            num_hist, num_object, num_filled = self._history(data, self.num_otf, self.num_keys, self.num_defaults,
                                                             {}, truncate)
            cat_hist, num_hist = self._align(cat_hist, num_hist, warnings)
        rows = len(cat_hist[0]) if cat_hist else 0
        if self.strict and rows > self.max_history:
            cat_hist = [c[-self.max_history:] for c in cat_hist]
            num_hist = [c[-self.max_history:] for c in num_hist]
            rows = self.max_history
        # current rows (objectId overwritten with "CURRENT"), default-filled
        blank_date = self.strict and data["orderDate"] in BLANKS
        get = data.__getitem__
        cat_row = list(map(get, self.cat_keys[:-1]))  # objectId is the last key of every current list
        cat_row.append(CURRENT)
        for i, v in zip(self.numcat_positions, current.values()):
            cat_row[i] = v
        self._fill_row(cat_row, self.cat_keys, self.cat_defaults)
        num_row = list(map(get, self.num_keys[:-1]))
        num_row.append(CURRENT)
        row_object, row_bool = self._fill_row(num_row, self.num_keys, self.num_defaults)
        num_object = num_object or row_object
        dense_row = list(map(get, self.dense_keys[:-1]))
        dense_row.append(CURRENT)
        dense_object, dense_bool = self._fill_row(dense_row, self.dense_keys, self.dense_defaults)
        # categorical matrix -> embedding rows (51, 108), left padded; column by column, current order last
        L, n_cat, n_rows = self.seq_len, self.n_cat, self.n_rows
        flat: list[int] = []
        out_of_range = False
        for j in range(n_cat):
            col = cat_hist[j] if rows else []
            if j in cat_filled:
                col = [_text(v) for v in col]
            m = self.cat_maps[j]
            cur = cat_row[j]
            if cur.__class__ is not str:
                cur = _text(cur)
            if m is not None:
                flat.extend(map(m.get, col, repeat(0, len(col))))
                flat.append(m.get(cur, 0))
            else:
                vals = [_int_in_str_array(t) for t in col]
                vals.append(_int_in_str_array(cur))
                out_of_range = out_of_range or min(vals) < 0 or max(vals) >= n_rows
                flat.extend(vals)
        if rows + 1 > L:
            raise ValueError(NEGATIVE_PADDING)
        # numerical matrix: 51 features (scaled) + order date (time to the current order); objectId dropped
        n_num = self.n_num
        cols = [[*num_hist[j], num_row[j]] for j in range(n_num + 1)] if rows else [[v] for v in num_row[:-1]]
        num = None
        if not (num_object or row_bool or (num_filled & self.num_bool_defaults)):
            try:  # the common case: every cell a number or a numeric string
                num = np.fromiter(map(float, chain.from_iterable(cols)), dtype=np.float64,
                                  count=(n_num + 1) * (rows + 1))
            except (ValueError, TypeError):
                num = None
        if num is None:  # exact numpy semantics, column by column: raises at the first bad cell
            num = np.array([x for col in cols for x in _parse_floats(col, num_object, exact=True)], dtype=np.float64)
        num = num.reshape(n_num + 1, rows + 1)
        with np.errstate(over="ignore", invalid="ignore"):
            feats = num[:n_num].T * self.num_scale + self.num_min  # (rows + 1, n_num) float64
            dates = num[n_num]
            delta = dates[-1] - dates  # float64 on the raw values: float32 spacing near 1.7e9 is 128
            latest = delta.max()  # NaN if any is NaN (and NaN > 1e7 is false: the check passes)
        if latest > DATE_LIMIT:
            return self._fail(BAD_ORDER_DATE, f"history {rows} rows")
        if self.strict:
            self._strict_dates(blank_date, dates, delta)
        # dense vector (413): the current row without orderDate / objectId, scaled with the static scalers
        dense = np.array(_parse_floats(dense_row[:self.n_dense], dense_object, dense_bool), dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            dense = dense * self.static_scale + self.static_min
        # embedding rows outside the table: the legacy model raised here, after data_parsing
        if out_of_range:
            raise LegacyRequestError(IndexError(INDEX_OUT_OF_RANGE))
        with np.errstate(over="ignore", invalid="ignore"):
            x_cat = np.zeros((L, n_cat), dtype=np.float32)
            x_cat[L - rows - 1:] = np.array(flat, dtype=np.float32).reshape(n_cat, rows + 1).T
            x_num = np.zeros((L, n_num), dtype=np.float32)
            x_num[L - rows - 1:] = feats
            time_seq = np.zeros((L, 1), dtype=np.float32)
            time_seq[L - rows - 1:, 0] = delta
            x_eng = dense.astype(np.float32)
        kpm = np.ones(L + 1, dtype=bool)
        kpm[L - rows - 1:] = False  # real rows and the model's own last slot are not masked
        if warnings and logger.isEnabledFor(logging.INFO):
            for w in warnings:
                logger.info("sanity check warning: %s (%d keys, history %d rows)", w, len(data), rows)
        return ModelInputs(x_cat, x_num, time_seq, kpm, x_eng, rows, tuple(warnings))

    def _align(self, cat: list[list], num: list[list], warnings: list[str]) -> tuple[list[list], list[list]]:
        """Legacy §3.7: equal row counts are used row by row as they are (its misalignment guard compares
        the cat objectIds with themselves); different counts keep the objectIds present in both, first
        occurrences, sorted by objectId as text (np.intersect1d)."""
        rc, rn = len(cat[0]), len(num[0])
        if rc == rn and not self.strict:
            return cat, num
        cat_ids, num_ids = [_text(v) for v in cat[-1]], [_text(v) for v in num[-1]]
        if rc == rn:
            if cat_ids != num_ids:
                bad = next(i for i, (a, b) in enumerate(zip(cat_ids, num_ids)) if a != b)
                raise StrictRefusal(f"strict: the categorical and numerical histories ({rc} rows each) are not "
                                    f"aligned: their objectId sequences first differ at history row {bad}")
            return cat, num
        if self.strict:
            raise StrictRefusal(f"strict: the categorical history has {rc} rows and the numerical one {rn}; the "
                                "legacy would keep the objectIds present in both, reordered by objectId text")
        warnings.append(MISMATCH)
        first_cat: dict[str, int] = {}
        for i, v in enumerate(cat_ids):
            first_cat.setdefault(v, i)
        first_num: dict[str, int] = {}
        for i, v in enumerate(num_ids):
            first_num.setdefault(v, i)
        common = sorted(first_cat.keys() & first_num.keys())
        ic, inum = [first_cat[v] for v in common], [first_num[v] for v in common]
        return [[c[i] for i in ic] for c in cat], [[c[i] for i in inum] for c in num]

    def _strict_dates(self, blank: bool, dates: np.ndarray, delta: np.ndarray) -> None:
        if blank:
            raise StrictRefusal("strict: the current orderDate is blank (the legacy replaces it with its default "
                                "and scores hugely negative time gaps)")
        if math.isnan(dates[-1]):
            raise StrictRefusal("strict: the current orderDate is NaN (the legacy scores it with NaN time gaps)")
        if np.isnan(delta).any():
            raise StrictRefusal("strict: a history orderDate is NaN (the legacy scores it with a NaN time gap)")
        if (delta < 0).any():
            raise StrictRefusal(f"strict: {int((delta < 0).sum())} history order(s) are dated after the current "
                                "order (negative time gaps, which the legacy's date check lets through)")
