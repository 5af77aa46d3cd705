"""The legacy job's output files: every reader and writer, in one place (legacy ``utilities.py``,
legacy-tsa.md §12), relied on by the calibration and deployment steps.

Byte formats:

- ``score_file.csv`` / ``cali_score_file.csv``: ``softmax(scores)[:, -1]``, one value per line, no
  header, each line ``str(np.float32(v)) + "\\n"``;
- ``tag_file.csv`` / ``cali_tag_file.csv``: labels, each line ``str(int(v)) + "\\n"``;
- ``percentile_score.pkl``: ``pickle.dump([[np.percentile(cali, 100 * k / 1000), k / 1000] for k in
  range(1000)], f)`` with ``cali`` the calibration scores as a float32 array, default protocol.

Readers refuse bad content in one line naming the file (:class:`LegacyJobError`, a ``ValueError``).
``percentile_score.pkl`` is read with a restricted unpickler (:func:`load_percentile_rows`): the only
globals it resolves are the ones numpy needs to rebuild a float32 / float64 scalar, each replaced by a
checking wrapper, so a user's file never runs code. :func:`read_percentile_table` checks the legacy
writer's layout (1000 ``[value, k / 1000]`` pairs); the endpoint's own checks of a table (finite,
ordered) are :class:`lightning_port.serving.calibration.PercentileTable`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .legacy_hparams import LegacyJobError
from .tolerances import PERCENTILE_LEVELS

__all__ = [
    "LEGACY_OUTPUTS",
    "PERCENTILE_ROWS",
    "LegacyJobError",
    "load_percentile_rows",
    "output_names",
    "percentile_table",
    "read_percentile_table",
    "read_score_file",
    "read_tag_file",
    "write_percentile_table",
    "write_score_file",
    "write_tag_file",
]

PERCENTILE_ROWS = 1000  # legacy: [np.percentile(cali, 100 * k / 1000), k / 1000] for k = 0..999
LEGACY_OUTPUTS = ("score_file.csv", "tag_file.csv", "cali_score_file.csv", "cali_tag_file.csv", "percentile_score.pkl")


def output_names(split: str) -> dict[str, str]:
    """Legacy file names for a split's scores, tags (and percentile table for ``cali``), and the name of
    the endpoint-columns file (``endpoint``, written by ``tsa-score`` only with ``--percentiles`` /
    ``--calibration``)."""
    if split == "vali":
        return {"scores": "score_file.csv", "tags": "tag_file.csv", "endpoint": "endpoint_scores.csv"}
    if split == "cali":
        return {"scores": "cali_score_file.csv", "tags": "cali_tag_file.csv", "percentiles": "percentile_score.pkl",
                "endpoint": "cali_endpoint_scores.csv"}
    return {"scores": f"{split}_score_file.csv", "tags": f"{split}_tag_file.csv",
            "endpoint": f"{split}_endpoint_scores.csv"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---- score and tag files --------------------------------------------------------------------------------
def write_score_file(path: str | Path, scores: Iterable[Any]) -> Path:
    """One ``str(np.float32(v))`` per line, no header."""
    path = Path(path)
    with open(path, "w") as f:
        for v in scores:
            f.write(str(np.float32(v)) + "\n")
    return path


def write_tag_file(path: str | Path, labels: Iterable[Any]) -> Path:
    """One ``str(int(v))`` per line, no header."""
    path = Path(path)
    with open(path, "w") as f:
        for v in labels:
            f.write(str(int(v)) + "\n")
    return path


def _read_column(path: Path, dtype, expected: str, expected_columns: str) -> np.ndarray:
    """One value per line -> 1-d array; unreadable text or several columns is a one-line LegacyJobError."""
    try:
        values = np.loadtxt(path, dtype=dtype, ndmin=1, comments=None)
    except (ValueError, OSError) as e:
        raise LegacyJobError(f"{path}: {_first_line(e)}; expected {expected}") from None
    if values.ndim != 1:
        raise LegacyJobError(f"{path}: {values.shape[1]} columns; expected {expected_columns}")
    return values


def read_score_file(path: str | os.PathLike) -> np.ndarray:
    """A legacy ``*score_file.csv``: one ``str(np.float32(v))`` per line -> float32 array (NaN kept)."""
    return _read_column(Path(path), np.float32, "one score per line", "one score per line")


def read_tag_file(path: str | os.PathLike) -> np.ndarray:
    """A legacy ``*tag_file.csv``: one integer label per line -> int64 array."""
    path = Path(path)
    values = _read_column(path, np.float64, "one integer label per line", "one label per line")
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        line = int(np.flatnonzero(bad)[0])
        raise LegacyJobError(f"{path}: line {line + 1} holds {values[line]!r}; expected an integer label")
    return values.astype(np.int64)


# ---- percentile_score.pkl -------------------------------------------------------------------------------
def percentile_table(cali_scores: Any) -> list[list[Any]]:
    """``[[np.percentile(cali, 100 * k / 1000), k / 1000] for k in range(1000)]`` on float32 scores."""
    arr = np.asarray(cali_scores, dtype=np.float32)
    if arr.size == 0:
        raise ValueError("percentile table: no calibration scores")
    return [[np.percentile(arr, 100 * k / PERCENTILE_ROWS), k / PERCENTILE_ROWS] for k in range(PERCENTILE_ROWS)]


def write_percentile_table(path: str | Path, cali_scores: Any) -> Path:
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump(percentile_table(cali_scores), f)
    return path


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Refused(pickle.UnpicklingError):
    """The restricted unpickler refused something the file asks for (nothing was executed)."""


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
        raise _Refused(f"global {module}.{name} is not allowed (a percentile table holds only "
                                     "numpy float scalars and numbers)")


_FLOAT_DTYPES = {"f4", "f8", "<f4", "<f8", ">f4", ">f8", "=f4", "=f8"}


def _float_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if not isinstance(spec, str) or spec not in _FLOAT_DTYPES:
        raise _Refused(f"it holds a numpy scalar of dtype {_short(spec)}; only float32/float64 are "
                                     "allowed")
    return np.dtype(spec, copy=True)  # a copy: BUILD then sets its state, never on numpy's shared descriptor


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or len(text) > 8:
        raise _Refused("it encodes something other than a float scalar's bytes")
    return text.encode("latin1")


def _float_scalar(dtype: Any, data: Any = None) -> np.floating:
    if not isinstance(dtype, np.dtype) or dtype.kind != "f" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise _Refused("it holds a numpy scalar that is not a float32/float64 value")
    return np.frombuffer(data, dtype=dtype)[0]


_ARRAY_DTYPE = re.compile(r"^[<>=|]?(f[248]|i[1248]|u[1248]|b1|U\d{1,6}|S\d{1,6})$")


def _array_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str) or not _ARRAY_DTYPE.match(spec):
        raise _Refused(f"it holds numpy data of dtype {_short(spec)}; only numbers and strings "
                       "are allowed (no objects)")
    return np.dtype(spec, copy=True)  # a copy: BUILD then sets its state, never on numpy's shared descriptor


def _array_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or len(text) > _MAX_ARRAY_TEXT:
        raise _Refused("it encodes something other than array bytes")
    return text.encode("latin1")


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    if cls is not np.ndarray or shape != (0,) or dtype not in (b"b", "b"):
        raise _Refused("it rebuilds a numpy array in an unexpected way")
    return np.ndarray((0,), dtype=np.uint8)  # BUILD then sets shape, dtype (checked) and the raw bytes


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if (not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.kind in "OV"
            or not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape)
            or order not in ("C", "F")):
        raise _Refused("it rebuilds a numpy array in an unexpected way")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _number_scalar(dtype: Any, data: Any = None) -> np.generic:
    if (not isinstance(dtype, np.dtype) or dtype.kind not in "fiub" or not isinstance(data, bytes)
            or len(data) != dtype.itemsize):
        raise _Refused("it holds a numpy scalar that is not a number")
    return np.frombuffer(data, dtype=dtype)[0]


class _ArrayUnpickler(_TableUnpickler):
    """:class:`_TableUnpickler` (numpy float scalars) extended to numpy arrays of
    numbers or strings, as ``pickle.dump`` of a dict of sklearn ``MinMaxScaler`` attributes writes them
    (``_reconstruct`` + ``ndarray`` + ``dtype`` for protocols 2-4, ``_frombuffer`` for protocol 5), each
    replaced by a checking wrapper. Any other global (``os.system``, ``builtins.eval``, classes, object
    arrays) is refused: nothing from the file is executed."""

    ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "dtype"): _array_dtype,
        ("numpy._core.multiarray", "scalar"): _number_scalar,
        ("numpy.core.multiarray", "scalar"): _number_scalar,
        ("_codecs", "encode"): _array_bytes,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise _Refused(f"it refers to {module}.{name}, which the min-max scalers do not need (only "
                       "numpy arrays of numbers or strings, numbers and plain containers are allowed)")

_MAX_ARRAY_TEXT = 64 << 20  # the longest latin-1 text an array's bytes may be spelled in (protocol 2)


def load_restricted_pickle(path: str | os.PathLike, what: str, *, arrays: bool = False,
                           max_bytes: int | None = None) -> Any:
    """Unpickle ``path`` without running code: numpy float scalars, numbers and plain containers
    (:class:`_TableUnpickler`), and with ``arrays`` numpy arrays of numbers or strings too
    (:class:`_ArrayUnpickler`: the legacy ``preprocessor.pkl``). :class:`LegacyJobError` in one line naming
    ``what`` and the file when it is missing, larger than ``max_bytes``, damaged, or asks for anything else
    (then nothing of it ran)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise LegacyJobError(f"{what} {path} does not exist") from None
    if max_bytes is not None and size > max_bytes:
        raise LegacyJobError(f"{what} {path}: {size} bytes, more than the {max_bytes} such a file needs")
    try:
        with open(path, "rb") as f:
            return (_ArrayUnpickler if arrays else _TableUnpickler)(f).load()
    except _Refused as exc:
        raise LegacyJobError(f"{what} {path}: not loaded: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line, no traceback
        raise LegacyJobError(f"{what} {path}: damaged or not a pickle ({type(exc).__name__}: {_first_line(exc)})"
                             ) from None


def load_percentile_rows(path: str | os.PathLike) -> Any:
    """The unpickled content of a ``percentile_score.pkl`` (the legacy writes a list of ``[value, level]``
    pairs), read with the restricted unpickler; :class:`LegacyJobError` in one line naming the file when it
    is missing, damaged, or asks for anything but numpy float scalars (then nothing of it ran)."""
    path = Path(path)
    if not path.is_file():
        raise LegacyJobError(f"{path}: does not exist; expected the legacy percentile_score.pkl")
    try:
        with open(path, "rb") as f:
            return _TableUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise LegacyJobError(f"{path}: not loaded: refused: {_first_line(e)} (the file was not unpickled "
                             "further)") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line, no traceback
        raise LegacyJobError(f"{path}: damaged or not a pickle ({type(e).__name__}: {_first_line(e)})") from None


def read_percentile_table(path: str | os.PathLike, rows: int = PERCENTILE_ROWS) -> np.ndarray:
    """``percentile_score.pkl`` -> float64 array (rows, 2) of ``[percentile value, k / rows]``, the legacy
    writer's layout. Refused in one line: what :func:`load_percentile_rows` refuses, or a table that is
    not ``rows`` pairs of numbers with levels k / rows."""
    path = Path(path)
    table = load_percentile_rows(path)
    try:
        arr = np.asarray([[float(a), float(b)] for a, b in table], dtype=np.float64)
    except (TypeError, ValueError):
        raise LegacyJobError(f"{path}: expected a list of [percentile value, fraction] pairs of numbers") from None
    if arr.shape != (rows, 2):
        raise LegacyJobError(f"{path}: {len(arr)} rows; expected {rows} ([np.percentile(cali, 100 k / {rows}), "
                             f"k / {rows}] for k = 0..{rows - 1})")
    if not PERCENTILE_LEVELS.within(arr[:, 1], np.arange(rows) / rows).all():
        raise LegacyJobError(f"{path}: the fractions are not k / {rows} for k = 0..{rows - 1}")
    return arr
