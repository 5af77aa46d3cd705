"""Legacy ``pytorch_inference_handler.py``: the SageMaker PyTorch endpoint of the single-sequence TSA model,
reproduced from its recorded behaviour (legacy-endpoint.md §1-§9; ground truth parity/fixtures/endpoint/).

The four SageMaker functions::

    model = model_fn(model_dir)                   # features.json in model_dir, else model_fn(model_dir, features=PATH)
    data = input_fn(body, content_type)           # json.loads; ValueError("<ct> not supported by script!")
    prediction = predict_fn(data, model)          # int -1 (sanity failure) or a Python float (softmax[1] of float32)
    answer = output_fn(prediction, accept)        # {"predictions": [{"score-percentile", "legacy-score", "ProbabilityScore"}]}

Everything is the legacy's, numpy string/object arrays and float64 included, so the legacy's exceptions (type and
message) come out of the same numpy/Python operations; every quirk is kept and commented in one line. Scores come
from :class:`reference.models.OrderFeatureAttentionClassifier` built with the handler's constants
(``features.json`` -> ``handler.model_args``), eval mode, no-grad.

Two differences from the genuine file, neither visible in an answer:
- ``preprocessor.pkl`` and ``percentile_score.pkl`` are read by :mod:`reference.safe_pickle` (plain values and
  numpy arrays only) instead of ``pickle.load``: a hostile pickle is refused in one line, nothing in it runs.
- the artefacts ``data_parsing`` needs travel on the object ``model_fn`` returns instead of module globals
  (``output_fn`` has no model argument, so the percentile table and the spline stay module globals, as in the
  legacy: the last ``model_fn`` call wins).

The handler prints its log lines with ``print`` (warnings and failures print the whole request after
``Source:``, the legacy's personal-data leak, kept). :func:`captured_log` collects them per print call, in the
form the recorder stored them (the text before ``Source:``).

Where legacy-endpoint.md and the recording are silent (each choice reproduces every recorded request; they only
decide which error a request with two faults at once raises, or what a log line holds after ``Source:``):
- ``data_parsing`` order: type and key checks, the no-history flag, the numerical-categorical normalisation (per
  index: the current value, then its history), the split of the two flag keys and the "not matured" warning, the
  history matrices (cat, then num), the current rows (cat, num, dense), the objectId alignment, the categorical
  matrix, the numerical matrix and the orderDate check, the dense vector;
- the "not matured" truncation is applied while the matrices are built and not written back into the request
  (only the normalisation is); the mismatch-length warning prints the request and both history matrices;
- a log line is ``<message> Source: <request>`` for the warnings and sanity failures (one print call each);
- the dead same-length guard's message is unknown (it never printed) and is written as a placeholder.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import BSpline

from . import safe_pickle
from .models import OrderFeatureAttentionClassifier

SEP = ";SEP;"
BLANK_VALUES = ("", "My Text String")  # legacy: the only two blank spellings, exact and case-sensitive
NUMCAT_CURRENT_EXEMPT = ("", "My Text String", "false")  # legacy: current-order values left as they are
NUMCAT_HISTORY_EXEMPT = ("",)  # legacy: the history exempts only "" (so "My Text String" / "false" crash there)
ORDER_DATE_MAX_DELTA = 10000000  # legacy: 1e7, strict >, no lower bound
CONTENT_TYPE = "application/json"
MODEL_FILE = "isSmall_0_OrderFeature.pt"  # legacy: hard-coded name (also features.json handler.model_file)
STATIC_DELETED = (266, 267)  # legacy: "will be deleted when generating new min-max scaler parameters"
# the order of the key checks (legacy-endpoint.md §2): the first missing key names its list in the log line
KEY_CHECK_ORDER = ("input_data_seq_cat_otf_vars", "input_data_seq_cat_vars", "input_data_seq_num_otf_vars",
                   "input_data_seq_num_vars", "input_data_dense_num_vars")
FEATURE_LISTS = ("seq_cat_vars", "seq_num_vars", "dense_num_vars", "input_data_seq_cat_vars",
                 "input_data_seq_num_vars", "input_data_dense_num_vars", "input_data_seq_cat_otf_vars",
                 "input_data_seq_num_otf_vars", "numerical_cat_vars_indices")

# legacy: output_fn reads these module globals, set by model_fn
percentile_score_list = None
bspline = None

_LOG_SINKS: list[list[str]] = []


def _print(*parts: Any) -> None:
    """The legacy's ``print``; every active :func:`captured_log` also gets the call's text."""
    text = " ".join(str(p) for p in parts)
    print(text)
    for sink in _LOG_SINKS:
        sink.append(text)


def recorded_form(text: str) -> str:
    """A printed line as the fixture recorder stored it: the text before ``Source:`` (the request dump)."""
    return text.split("Source:")[0].rstrip()


class CapturedLog:
    def __init__(self):
        self.raw: list[str] = []

    @property
    def lines(self) -> list[str]:
        return [recorded_form(t) for t in self.raw]


@contextlib.contextmanager
def captured_log(echo: bool = False):
    """Collect the handler's print calls (``.lines``: as recorded; ``.raw``: as printed); stdout is silenced
    unless ``echo``."""
    log = CapturedLog()
    _LOG_SINKS.append(log.raw)
    try:
        if echo:
            yield log
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                yield log
    finally:
        _LOG_SINKS.remove(log.raw)


class CategoricalTransformer:
    """Legacy ``CategoricalTransformer.py``: maps each categorical column through its ``cat_to_index`` entry."""

    def __init__(self, categorical_map, columns_list):
        self.categorical_map = categorical_map
        self.columns_list = columns_list

    def transform(self, X):
        X = np.asarray(X).astype(str)  # legacy: object rows (a JSON null) become text here: None -> "None"
        for i, col in enumerate(self.columns_list):
            if col in self.categorical_map:
                mapping = self.categorical_map[col]
                # legacy: written into the input's string width; an unknown category is None -> the text "None"
                X[:, i] = [mapping.get(v) for v in X[:, i]]
            # legacy: a column without a map keeps its raw text (later parsed as an embedding row)
        X[X == "None"] = "0"  # legacy: also a literal "None" or JSON null, in any column: index 0 = padding
        return X


class HandlerModel:
    """What :func:`model_fn` returns: the legacy network and the artefacts ``data_parsing`` reads."""

    def __init__(self, model, features, cat_to_index, default_value_dict, preprocessor, percentile_table, spline,
                 model_dir):
        self.model = model
        self.features = features
        self.cat_to_index = cat_to_index
        self.default_value_dict = default_value_dict
        self.seq_num_scale_ = preprocessor["seq_num_scale_"]
        self.seq_num_min_ = preprocessor["seq_num_min_"]
        # legacy: static positions 266 and 267 deleted at load (a 413-entry file breaks the product later)
        self.num_static_scale_ = np.delete(preprocessor["num_static_scale_"], list(STATIC_DELETED))
        self.num_static_min_ = np.delete(preprocessor["num_static_min_"], list(STATIC_DELETED))
        self.percentile_score_list = percentile_table
        self.bspline = spline
        self.model_dir = model_dir
        self.seq_len = int(features["seq_len"])
        self.sep = features.get("SEP", SEP)
        self.no_history_keys = tuple(features["handler"]["no_history_keys"])


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path}: not JSON ({exc})") from None


def load_features(model_dir, features=None) -> dict:
    """The feature lists: ``features.json`` in ``model_dir`` if present, else the file ``features``."""
    inside = Path(model_dir) / "features.json"
    path = inside if inside.is_file() else (Path(features) if features is not None else None)
    if path is None:
        raise ValueError(f"model folder {model_dir}: no features.json in it and no features=PATH given (the legacy "
                         "params.py feature lists, as data)")
    feats = _read_json(path, "feature lists")
    missing = [k for k in (*FEATURE_LISTS, "seq_len", "handler") if k not in feats]
    if missing:
        raise ValueError(f"feature lists {path}: missing key(s) {', '.join(missing)}")
    return feats


def model_fn(model_dir, features=None):
    """Load the legacy model folder: weights, scalers, percentile table, spline, category maps, defaults."""
    global percentile_score_list, bspline
    model_dir = Path(model_dir)
    feats = load_features(model_dir, features)
    handler = feats["handler"]
    model = OrderFeatureAttentionClassifier(**handler["model_args"])
    weights = model_dir / handler.get("model_file", MODEL_FILE)
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict)  # legacy: strict
    model.eval()

    preprocessor = safe_pickle.load(model_dir / "preprocessor.pkl", "preprocessor")
    if not isinstance(preprocessor, dict):
        raise ValueError(f"preprocessor {model_dir / 'preprocessor.pkl'}: expected a dict of scaler arrays, got "
                         f"{type(preprocessor).__name__}")
    missing = [k for k in ("seq_num_scale_", "seq_num_min_", "num_static_scale_", "num_static_min_")
               if k not in preprocessor]
    if missing:
        raise ValueError(f"preprocessor {model_dir / 'preprocessor.pkl'}: missing key(s) {', '.join(missing)}")
    table = safe_pickle.load(model_dir / "percentile_score.pkl", "percentile table")
    params = _read_json(model_dir / "bspline_parameters.json", "spline parameters")
    # legacy: no extrapolation; a failed R job's empty coefficients raise here (AxisError / ValueError)
    spline = BSpline(params["knots"], params["coefficients"], params["degree"], extrapolate=False)
    cat_to_index = _read_json(model_dir / "cat_to_index.json", "category maps")
    default_value_dict = _read_json(model_dir / "default_value_dict.json", "default values")

    percentile_score_list = table  # legacy: module globals read by output_fn
    bspline = spline
    torch.set_num_threads(1)  # legacy: the handler scores single-threaded (the whole process)
    return HandlerModel(model, feats, cat_to_index, default_value_dict, preprocessor, table, spline, model_dir)


def input_fn(request_body, request_content_type):
    if request_content_type == CONTENT_TYPE:  # legacy: exact match ("; charset=utf-8" and None refused)
        return json.loads(request_body)  # legacy: Python's parser (NaN / Infinity literals accepted)
    raise ValueError(f"{request_content_type} not supported by script!")


def _fill(value, name, defaults):
    # legacy: only "" and "My Text String" are blank; a blank without a default raises KeyError(name)
    return defaults[name] if value in BLANK_VALUES else value


def data_parsing(input_data, model: HandlerModel):
    """The request dict -> (x_cat, x_num, x_engineered, time_seq, key_padding_mask) numpy arrays, or -1 (sanity
    failure). Mutates the request (objectId, numerical-categorical values) as the legacy did."""
    F = model.features
    defaults = model.default_value_dict
    sep = model.sep
    seq_len = model.seq_len

    if not isinstance(input_data, dict):
        _print("Sanity check failed. Input data is not a dict obj.", "Source:", input_data)
        return -1
    input_data["objectId"] = "CURRENT"  # legacy: overwritten before the key checks (never needs to be sent)
    for list_name in KEY_CHECK_ORDER:
        for key in F[list_name]:
            if key not in input_data:
                _print(f"Sanity check failed. Input data does not contain required key in {list_name}.", "Source:",
                       input_data)
                return -1

    billing_key, declr_key = model.no_history_keys
    # legacy: only these two keys decide "no history"; the other 161 history strings are then ignored
    no_history = input_data[billing_key] in BLANK_VALUES or input_data[declr_key] in BLANK_VALUES

    # numerical categoricals: int(float(x)) written back into the request (defaults are never normalised)
    seq_cat_vars = F["seq_cat_vars"]
    for idx in F["numerical_cat_vars_indices"]:
        var = seq_cat_vars[idx]
        if input_data[var] not in NUMCAT_CURRENT_EXEMPT:
            input_data[var] = str(int(float(input_data[var])))
        if not no_history:
            otf = F["input_data_seq_cat_otf_vars"][idx]
            # legacy: the whole sequence, before the "not matured" truncation (dropped elements can crash too)
            input_data[otf] = sep.join(x if x in NUMCAT_HISTORY_EXEMPT else str(int(float(x)))
                                       for x in input_data[otf].split(sep))

    # "OTF not matured": only the two flag keys' element counts are compared (split even without history)
    len_billing = len(input_data[billing_key].split(sep))
    len_declr = len(input_data[declr_key].split(sep))
    min_len = min(len_billing, len_declr)
    not_matured = len_billing != len_declr
    if not_matured:
        _print("Sanity check warning. Input data OTF not matured. Lengths of two batches not matched.", "Source:",
               input_data)

    def history(otf_key):
        seq = input_data[otf_key].split(sep)
        # legacy: keeps the newest min_len elements, assuming the oldest are the missing ones
        return seq[-min_len:] if not_matured else seq

    if not no_history:
        # one row per order, columns in list order (last two: orderDate, objectId); ragged lengths raise here
        seq_cat_mtx = np.array([[_fill(x, var, defaults) for x in history(otf)] for otf, var in
                                zip(F["input_data_seq_cat_otf_vars"], F["input_data_seq_cat_vars"])]).T
        seq_num_mtx = np.array([[_fill(x, var, defaults) for x in history(otf)] for otf, var in
                                zip(F["input_data_seq_num_otf_vars"], F["input_data_seq_num_vars"])]).T
    cur_cat = np.array([_fill(input_data[var], var, defaults) for var in F["input_data_seq_cat_vars"]])
    cur_num = np.array([_fill(input_data[var], var, defaults) for var in F["input_data_seq_num_vars"]])
    cur_dense = np.array([_fill(input_data[var], var, defaults) for var in F["input_data_dense_num_vars"]])

    if not no_history:
        cat_ids, num_ids = seq_cat_mtx[:, -1], seq_num_mtx[:, -1]
        if seq_cat_mtx.shape[0] == seq_num_mtx.shape[0]:
            # legacy: meant to catch same-length/mismatched lines, but compares the cat order with itself: dead
            if not np.array_equal(np.argsort(cat_ids), np.argsort(cat_ids)):
                _print("Sanity check warning. (message unknown: never printed)", "Source:", input_data)
        else:
            _print("Sanity check warning. Input data OTFs have mismatch length. Use only currently order for "
                   "evaluation.", "Source:", input_data, seq_cat_mtx, seq_num_mtx)
            # legacy: despite the message, keeps the shared objectIds, sorted as strings (not by time), first
            # occurrence of duplicates; none shared -> an empty history
            _, cat_idx, num_idx = np.intersect1d(cat_ids, num_ids, return_indices=True)
            seq_cat_mtx, seq_num_mtx = seq_cat_mtx[cat_idx], seq_num_mtx[num_idx]

    # categorical matrix: drop orderDate and objectId, current row last, map, parse, left-pad
    if no_history:
        cat_mtx = cur_cat[:-2].reshape(1, -1)
    else:
        cat_mtx = np.vstack([seq_cat_mtx[:, :-2], cur_cat[:-2]])  # legacy: the cat group's orderDate is unused
    cat_mtx = CategoricalTransformer(model.cat_to_index, seq_cat_vars).transform(cat_mtx).astype(int)
    # legacy: more than seq_len - 1 history rows -> negative pad width -> ValueError (nothing truncates to 50)
    cat_mtx = np.pad(cat_mtx, ((seq_len - cat_mtx.shape[0], 0), (0, 0)))

    # numerical matrix: drop objectId, keep orderDate, current row last, a column of ones (not padded)
    if no_history:
        num_mtx = cur_num[:-1].reshape(1, -1)
    else:
        num_mtx = np.vstack([seq_num_mtx[:, :-1], cur_num[:-1]])
    num_mtx = num_mtx.astype(float)  # legacy: Python float semantics ("nan", "inf", spaces ok; null -> NaN)
    num_mtx = np.hstack([num_mtx, np.ones((num_mtx.shape[0], 1))])
    num_mtx[:, :-2] = num_mtx[:, :-2] * model.seq_num_scale_ + model.seq_num_min_  # MinMaxScaler forward, float64
    num_mtx[:, -2] = num_mtx[-1, -2] - num_mtx[:, -2]  # time to the current order, float64, raw units
    # legacy: no lower bound (future or blank current dates pass); NaN passes (NaN > 1e7 is False)
    if np.max(num_mtx[:, -2]) > ORDER_DATE_MAX_DELTA:
        _print("Sanity check failed. Sequence OTF recorded wrong orderDate.", "Source:", input_data)
        return -1
    num_mtx = np.pad(num_mtx, ((seq_len - num_mtx.shape[0], 0), (0, 0)))  # padding rows: exact zeros, ones col 0

    # dense: parsed only after the orderDate check (bad text + bad date answers -1)
    dense = cur_dense[:-2].astype(float)
    dense = dense * model.num_static_scale_ + model.num_static_min_

    x_num = num_mtx[:, :-2]
    time_seq = num_mtx[:, -2:-1]
    not_padded = num_mtx[:, -1]
    key_padding_mask = ~np.append(not_padded, 1).astype(bool)  # legacy: + the summary token, True = padding
    _print("Data sanity check passed and preprocessed.")
    return cat_mtx, x_num, dense, time_seq, key_padding_mask


def predict_fn(input_data, model: HandlerModel):
    parsed = data_parsing(input_data, model)
    if isinstance(parsed, int) and parsed == -1:
        _print("Sanity check failed. Model return -1")
        return -1
    x_cat, x_num, x_engineered, time_seq, key_padding_mask = parsed
    # every input float32 with a batch of one; the casts from float64 / int64 happen only here
    x_cat = torch.tensor(x_cat, dtype=torch.float32).unsqueeze(0)  # (1, 51, 108): the model casts back with .int()
    x_num = torch.tensor(x_num, dtype=torch.float32).unsqueeze(0)  # (1, 51, 51)
    x_engineered = torch.tensor(x_engineered, dtype=torch.float32).unsqueeze(0)  # (1, 413)
    time_seq = torch.tensor(time_seq, dtype=torch.float32).unsqueeze(0)  # (1, 51, 1)
    key_padding_mask = torch.tensor(key_padding_mask).unsqueeze(0)  # (1, 52) bool
    net = model.model
    net.eval()
    with torch.no_grad():
        scores, _ = net(x_cat, x_num, x_engineered, time_seq, attn_mask=None, key_padding_mask=key_padding_mask)
        score = torch.softmax(scores[0], dim=-1)[1]
    return score.item()  # the float32 value widened exactly to a Python float


def get_percentile_score(score, percentile_score_list):
    """Legacy binary search over ``[[score_i, pct_i], ...]``: an exact match returns the NEXT row's pct."""
    if score <= 0:
        return 0
    if score >= 1:
        return 1
    lo, hi = 0, len(percentile_score_list) - 1
    found = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if percentile_score_list[mid][0] == score:
            found = mid
            break
        if percentile_score_list[mid][0] < score:
            lo = mid + 1
        else:
            hi = mid - 1
    idx = hi if found is None else found  # legacy: ties follow the search path; NaN runs hi down to -1
    if idx == len(percentile_score_list) - 1:
        return percentile_score_list[-1][1]  # legacy: above the last row gives its pct (0.999), never 1
    return percentile_score_list[idx + 1][1]


def get_probability_score(score, bspline):
    """Legacy calibration: logistic of the B-spline, 1 above 25, integers 0 / 1 outside (0, 1)."""
    if score <= 0:
        return 0
    if score >= 1:
        return 1
    z = bspline(score)  # legacy: no extrapolation -> NaN outside the knot span
    if z > 25:
        return 1
    return np.exp(z) / (np.exp(z) + 1)  # legacy: written this way (not 1 / (1 + e^-z)), float64, no lower clamp


def _format(value):
    # legacy: exponent notation replaced by numpy's shortest positional digits, then str
    if "e" in str(value):
        value = np.format_float_positional(value)
    return str(value)


def output_fn(prediction, accept):
    if percentile_score_list is None or bspline is None:
        raise RuntimeError("output_fn called before model_fn: the percentile table and the spline are loaded there")
    if accept == CONTENT_TYPE:  # legacy: exact match; refused only after the model has run
        percentile = get_percentile_score(prediction, percentile_score_list)
        probability = get_probability_score(prediction, bspline)
        return {"predictions": [{"score-percentile": _format(percentile), "legacy-score": _format(prediction),
                                 "ProbabilityScore": _format(probability)}]}
    raise ValueError(f"output format doesn't support {accept}")
