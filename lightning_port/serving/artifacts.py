"""The legacy model folder, read as it is and validated (legacy-endpoint.md §9).

=========================  ==========================================================================
file                       read as
=========================  ==========================================================================
``features.json``          the legacy ``params.py`` lists as data (:class:`FeatureLists`): from
                           ``features=PATH`` if given, else ``MODEL_DIR/features.json`` if present,
                           else the genuine lists shipped with the package (``serving/features.json``)
``preprocessor.pkl``       min-max scalers, through a restricted unpickler (numpy numeric arrays,
                           numbers, strings and plain containers only: nothing is executed)
``percentile_score.pkl``   :func:`lightning_port.serving.calibration.load_percentile_table` (restricted unpickler)
``bspline_parameters.json`` :func:`lightning_port.serving.calibration.load_calibration`
``cat_to_index.json``      ``{column: {category: embedding row}}``
``default_value_dict.json`` ``{variable: default}``
weights                    :mod:`lightning_port.serving.scorers` (legacy ``.pt``, port ``.ckpt`` or ``.onnx``)
=========================  ==========================================================================

Every problem is an :class:`ArtifactError` (a ``ValueError``) with one line naming the file, the key and
what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..legacy_files import _short, load_restricted_pickle
from ..legacy_hparams import LegacyJobError
from . import calibration as post

FEATURES_FILE = "features.json"
PREPROCESSOR_FILE = "preprocessor.pkl"
PERCENTILE_FILE = "percentile_score.pkl"
CALIBRATION_FILE = "bspline_parameters.json"
CAT_MAP_FILE = "cat_to_index.json"
DEFAULTS_FILE = "default_value_dict.json"
PACKAGED_FEATURES = Path(__file__).with_name(FEATURES_FILE)  # parity/fixtures/endpoint/features.json, copied
ORDER_DATE, OBJECT_ID = "orderDate", "objectId"  # the last two entries of every input_data_* list
SCALER_KEYS = ("seq_num_scale_", "seq_num_min_", "num_static_scale_", "num_static_min_")
MAX_PICKLE_BYTES = 64 << 20


class ArtifactError(ValueError):
    """A model-folder file that the endpoint cannot serve from (one line, naming the file)."""


# --- features.json ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureLists:
    """``params.py`` as data, checked for the shape the legacy handler assumes (legacy-endpoint.md §2)."""

    sep: str
    seq_cat_vars: tuple[str, ...]
    seq_num_vars: tuple[str, ...]
    dense_num_vars: tuple[str, ...]
    input_cat: tuple[str, ...]  # seq_cat_vars + orderDate + objectId
    input_num: tuple[str, ...]
    input_dense: tuple[str, ...]
    cat_otf: tuple[str, ...]  # element i: the history of input_cat[i]
    num_otf: tuple[str, ...]
    numcat_indices: tuple[int, ...]  # positions in seq_cat_vars of the numerical categoricals
    seq_len: int
    model_args: dict[str, Any]  # the handler's model constants
    no_history_keys: tuple[str, str]
    deleted_static: tuple[int, ...]  # positions removed from the static scalers at load (legacy: 266, 267)
    model_file: str
    source: str

    @classmethod
    def from_dict(cls, d: Any, source: str, handler_fallback: dict[str, Any] | None = None) -> FeatureLists:
        def fail(msg: str) -> ArtifactError:
            return ArtifactError(f"{source}: {msg}")

        if not isinstance(d, dict):
            raise fail(f"expected a JSON object (params.py as data), got {type(d).__name__}")

        def names(key: str) -> tuple[str, ...]:
            v = d.get(key)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise fail(f"{key!r} must be a list of variable names")
            return tuple(v)

        sep = d.get("SEP")
        if not isinstance(sep, str) or not sep:
            raise fail("'SEP' must be a non-empty string (legacy: ';SEP;')")
        cat, num, dense = names("seq_cat_vars"), names("seq_num_vars"), names("dense_num_vars")
        lists = {}
        for key, base in (("input_data_seq_cat_vars", cat), ("input_data_seq_num_vars", num),
                          ("input_data_dense_num_vars", dense)):
            full = names(key)
            if full != (*base, ORDER_DATE, OBJECT_ID):
                raise fail(f"{key!r} must be {key.replace('input_data_', '')} followed by {ORDER_DATE!r} and "
                           f"{OBJECT_ID!r} ({len(base) + 2} names), got {len(full)} names")
            lists[key] = full
        cat_otf, num_otf = names("input_data_seq_cat_otf_vars"), names("input_data_seq_num_otf_vars")
        for otf, full in ((cat_otf, lists["input_data_seq_cat_vars"]), (num_otf, lists["input_data_seq_num_vars"])):
            if len(otf) != len(full) or len(set(otf)) != len(otf):
                raise fail(f"the history lists must name one distinct key per current variable ({len(full)}), "
                           f"got {len(otf)}")
        idx = d.get("numerical_cat_vars_indices")
        if (not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx)
                or not all(0 <= i < len(cat) for i in idx) or len(set(idx)) != len(idx)):
            raise fail(f"'numerical_cat_vars_indices' must be distinct integers in 0..{len(cat) - 1}")
        seq_len = d.get("seq_len")
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
            raise fail(f"'seq_len' must be an integer >= 2, got {seq_len!r}")
        handler = d.get("handler", handler_fallback)
        if not isinstance(handler, dict):
            raise fail("'handler' (the handler's model constants) is missing")
        args = handler.get("model_args")
        if not isinstance(args, dict):
            raise fail("'handler.model_args' must be an object of the legacy model constants")
        for key, want in (("n_cat_features", len(cat)), ("n_num_features", len(num)),
                          ("n_engineered_num_features", len(dense)), ("seq_len", seq_len)):
            if args.get(key) != want:
                raise fail(f"'handler.model_args.{key}' is {args.get(key)!r}, but the feature lists give {want}")
        flags = handler.get("no_history_keys")
        if not isinstance(flags, list) or len(flags) != 2 or not all(k in cat_otf for k in flags):
            raise fail("'handler.no_history_keys' must name two keys of input_data_seq_cat_otf_vars")
        deleted = handler.get("num_static_deleted_indices", [])
        if (not isinstance(deleted, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in deleted)
                or len(set(deleted)) != len(deleted) or any(i < 0 for i in deleted)):
            raise fail("'handler.num_static_deleted_indices' must be distinct integers >= 0")
        model_file = handler.get("model_file", "isSmall_0_OrderFeature.pt")
        if not isinstance(model_file, str) or "/" in model_file or not model_file:
            raise fail("'handler.model_file' must be a file name")
        return cls(sep, cat, num, dense, lists["input_data_seq_cat_vars"], lists["input_data_seq_num_vars"],
                   lists["input_data_dense_num_vars"], cat_otf, num_otf, tuple(idx), seq_len, dict(args),
                   (flags[0], flags[1]), tuple(sorted(deleted)), model_file, source)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{what} {path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise ArtifactError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def read_features(model_dir: Path, features: str | Path | None = None) -> FeatureLists:
    """``features`` if given, else ``model_dir/features.json`` if present, else the packaged genuine lists.
    A file without ``handler`` takes the packaged handler constants (the legacy handler's hard-coded ones)."""
    packaged = _read_json(PACKAGED_FEATURES, "packaged feature lists")
    if features is not None:
        path = Path(features)
    elif (model_dir / FEATURES_FILE).is_file():
        path = model_dir / FEATURES_FILE
    else:
        return FeatureLists.from_dict(packaged, f"packaged {FEATURES_FILE}")
    return FeatureLists.from_dict(_read_json(path, "feature lists"), f"feature lists {path}", packaged["handler"])


# --- preprocessor.pkl -------------------------------------------------------------------------------
def restricted_load(path: Path, what: str) -> Any:
    """Unpickle ``path`` with the project's restricted unpickler for numpy arrays
    (:func:`lightning_port.legacy_files.load_restricted_pickle`); one-line :class:`ArtifactError` otherwise."""
    try:
        return load_restricted_pickle(path, what, arrays=True, max_bytes=MAX_PICKLE_BYTES)
    except LegacyJobError as exc:
        raise ArtifactError(str(exc)) from None


@dataclass(frozen=True)
class Scalers:
    """sklearn ``MinMaxScaler`` forward transforms, x * scale + min, in float64."""

    seq_num_scale: np.ndarray  # (n_num,)
    seq_num_min: np.ndarray
    static_scale: np.ndarray  # (n_dense,): the stored (n_dense + deleted) entries with the deleted ones removed
    static_min: np.ndarray


def read_scalers(path: Path, features: FeatureLists) -> Scalers:
    obj = restricted_load(path, "preprocessor")
    if not isinstance(obj, dict):
        raise ArtifactError(f"preprocessor {path}: expected a dict of scaler arrays, got {type(obj).__name__}")
    n_num, n_dense, deleted = len(features.seq_num_vars), len(features.dense_num_vars), features.deleted_static
    want = {"seq_num_scale_": n_num, "seq_num_min_": n_num,
            "num_static_scale_": n_dense + len(deleted), "num_static_min_": n_dense + len(deleted)}
    out = {}
    for key in SCALER_KEYS:
        if key not in obj:
            raise ArtifactError(f"preprocessor {path}: missing key {key!r} (expected {', '.join(SCALER_KEYS)})")
        v = obj[key]
        arr = np.asarray(v) if isinstance(v, (np.ndarray, list, tuple)) else None
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "fiu":
            raise ArtifactError(f"preprocessor {path}: {key!r} must be a 1-D array of numbers, got "
                                f"{_short(v)}")
        if arr.size != want[key]:
            note = ""
            if key.startswith("num_static") and deleted:
                note = (f"; the legacy handler deletes positions {', '.join(map(str, deleted))} of the "
                        f"{want[key]}-entry static scaler at load, so a {arr.size}-entry file breaks it too")
            raise ArtifactError(f"preprocessor {path}: {key!r} has {arr.size} entries, expected {want[key]}{note}")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ArtifactError(f"preprocessor {path}: {key!r} holds a non-finite value at index "
                                f"{int(np.argmin(np.isfinite(arr)))}")
        out[key] = arr
    if max(deleted, default=-1) >= want["num_static_scale_"]:
        raise ArtifactError(f"{features.source}: deleted static positions {deleted} lie outside the scaler")
    keep = np.delete(np.arange(want["num_static_scale_"]), list(deleted))
    return Scalers(out["seq_num_scale_"], out["seq_num_min_"], out["num_static_scale_"][keep],
                   out["num_static_min_"][keep])


# --- JSON artefacts ---------------------------------------------------------------------------------
def read_cat_maps(path: Path, features: FeatureLists, n_rows: int) -> tuple[dict[str, int] | None, ...]:
    """One map per ``seq_cat_vars`` column (None: the column has no entry and keeps its raw value). Indices
    must be integers in 0..n_rows - 1 (rows of the embedding table)."""
    obj = _read_json(path, "categorical maps")
    if not isinstance(obj, dict):
        raise ArtifactError(f"categorical maps {path}: expected {{column: {{category: index}}}}, got "
                            f"{type(obj).__name__}")
    maps: list[dict[str, int] | None] = []
    for col in features.seq_cat_vars:
        m = obj.get(col)
        if m is None:
            maps.append(None)
            continue
        if not isinstance(m, dict):
            raise ArtifactError(f"categorical maps {path}: column {col!r} must map categories to indices, got "
                                f"{type(m).__name__}")
        for key, idx in m.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n_rows:
                raise ArtifactError(f"categorical maps {path}: column {col!r}, category {_short(key)} maps to "
                                    f"{_short(idx)}; expected an embedding row 0..{n_rows - 1}")
        maps.append(dict(m))
    return tuple(maps)


_DEFAULT_TYPES = (str, int, float, bool, type(None))


def read_defaults(path: Path) -> dict[str, Any]:
    obj = _read_json(path, "default values")
    if not isinstance(obj, dict):
        raise ArtifactError(f"default values {path}: expected {{variable: default}}, got {type(obj).__name__}")
    for key, v in obj.items():
        if not isinstance(v, _DEFAULT_TYPES):
            raise ArtifactError(f"default values {path}: the default of {key!r} is a {type(v).__name__}; expected "
                                "a string, a number or null")
    return obj


@dataclass(frozen=True)
class ModelFolder:
    """Everything but the weights, validated."""

    path: Path
    features: FeatureLists
    scalers: Scalers
    table: post.PercentileTable
    calibration: post.BSplineCalibration
    cat_maps: tuple[dict[str, int] | None, ...]
    defaults: dict[str, Any]

    @property
    def n_embedding_rows(self) -> int:
        """Rows of the shared embedding table (legacy: ``n_embedding + 2``); a categorical index outside
        0..rows - 1 makes the legacy model raise IndexError."""
        return int(self.features.model_args["n_embedding"]) + 2


def read_model_folder(model_dir: str | Path, features: str | Path | None = None) -> ModelFolder:
    path = Path(model_dir)
    if not path.is_dir():
        raise ArtifactError(f"model folder {path} does not exist (or is not a folder)")
    feats = read_features(path, features)
    n_emb = feats.model_args.get("n_embedding")
    if not isinstance(n_emb, int) or isinstance(n_emb, bool) or n_emb < 1:
        raise ArtifactError(f"{feats.source}: 'handler.model_args.n_embedding' must be a positive integer")
    scalers = read_scalers(path / PREPROCESSOR_FILE, feats)
    try:
        table = post.load_percentile_table(path / PERCENTILE_FILE)
        calibration = post.load_calibration(path / CALIBRATION_FILE)
    except ArtifactError:
        raise
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None
    maps = read_cat_maps(path / CAT_MAP_FILE, feats, n_emb + 2)
    defaults = read_defaults(path / DEFAULTS_FILE)
    return ModelFolder(path, feats, scalers, table, calibration, maps, defaults)
