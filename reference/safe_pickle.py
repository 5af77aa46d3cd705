"""A restricted unpickler for the legacy handler's artefacts (``preprocessor.pkl``, ``percentile_score.pkl``).

The legacy handler calls ``pickle.load`` on both files; this reproduction reads them with an unpickler that can
only rebuild plain Python values (lists, dicts, tuples, numbers, strings) and numpy arrays / scalars of
non-object dtypes -- the only things the genuine files hold. Anything else (a reference to ``os.system``,
``builtins.eval``, a class to instantiate, ...) is refused before it is called: nothing in the file is executed.

``load(path, what)`` raises ``ValueError`` with one line naming the file and what it referred to.
(Written here rather than imported: ``reference/`` does not depend on ``lightning_port``.)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

_RECONSTRUCT = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")}
_SCALAR = {("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")}
_FROMBUFFER = {("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer")}  # protocol 5
# numpy dtype kinds allowed: bool, signed/unsigned int, float, complex, bytes, str (no object, no void records)
_DTYPE_KINDS = set("biufcSU")
MAX_CODEC_TEXT = 1 << 26  # protocol 2 spells array bytes as latin-1 text; 64 MiB is far beyond these files


class RefusedPickle(pickle.UnpicklingError):
    pass


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if not isinstance(spec, str):
        raise RefusedPickle(f"it builds a numpy dtype from {type(spec).__name__}; only dtype names are allowed")
    try:
        dt = np.dtype(spec)
    except TypeError as exc:
        raise RefusedPickle(f"it names the numpy dtype {spec!r}, which numpy does not know ({exc})") from None
    if dt.kind not in _DTYPE_KINDS:
        raise RefusedPickle(f"it holds a numpy array or scalar of dtype {spec!r}; only numeric and string dtypes "
                            "are allowed")
    return np.dtype(spec, copy=True)  # a fresh descriptor: BUILD then sets its byte order on this copy only


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise RefusedPickle(f"it rebuilds an array of class {getattr(cls, '__name__', type(cls).__name__)}; only "
                            "numpy.ndarray is allowed")
    return np.ndarray.__new__(np.ndarray, shape, typecode)


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or not isinstance(data, bytes):
        raise RefusedPickle("it rebuilds a numpy scalar from something other than a numeric dtype and its bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or order not in ("C", "F"):
        raise RefusedPickle("it rebuilds a numpy array from something other than a numeric dtype and its bytes")
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise RefusedPickle("it rebuilds a numpy array from something other than bytes")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or len(text) > MAX_CODEC_TEXT:
        raise RefusedPickle("it encodes something other than an array's bytes")
    return text.encode("latin1")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECONSTRUCT:
            return _reconstruct
        if (module, name) in _SCALAR:
            return _scalar
        if (module, name) in _FROMBUFFER:
            return _frombuffer
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray  # only ever passed to _reconstruct, which checks it
        if (module, name) == ("numpy", "dtype"):
            return _dtype
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise RefusedPickle(f"it refers to {module}.{name}, which is neither a plain value nor a numpy array")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("it uses persistent ids")


def loads(data: bytes) -> Any:
    return _Unpickler(io.BytesIO(data)).load()


def load(path: str | Path, what: str = "pickle") -> Any:
    """The object pickled in ``path``; ``ValueError`` (one line: the file, why) for a hostile or damaged file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return loads(data)
    except RefusedPickle as exc:
        raise ValueError(f"{what} {path}: refused, nothing in it was run: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line, no traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {path}: not a readable pickle ({type(exc).__name__}: {first})") from None
