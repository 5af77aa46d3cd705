"""Replaying requests through a SageMaker-style endpoint and comparing its answers.

An :class:`Endpoint` is the four handler functions (``input_fn``, ``predict_fn``, ``output_fn``; ``model_fn`` has
run) of either side:

- ``reference``: :mod:`reference.pytorch_inference_handler`, the legacy handler reproduced (its log lines captured);
- ``port``: ``lightning_port.serving.inference`` (backend ``onnx`` or ``eager``), the contract of issue 19.

:func:`Endpoint.replay` sends one request (body byte for byte, its content type and accept) through
``input_fn -> predict_fn -> output_fn`` and returns an :class:`Outcome` in the recorded format of
``parity/fixtures/endpoint/responses.jsonl``: the answer dict, ``repr`` of the prediction and the log lines, or the
stage, exception type and message (first 500 characters) of a crash.

:func:`compare_outcomes` holds one outcome against another (the recorded one, or the other endpoint's):

- crashes: the same stage, exception type and message;
- answers: the same keys in the same order, strings. ``legacy-score``: equal to fp32 rounding
  (``endpoint.legacy_score`` in :mod:`parity.tolerances`); when the two legacy-score strings are equal,
  ``score-percentile`` and ``ProbabilityScore`` must be equal strings. When fp32 rounding moved the score, the
  percentile may differ only if a percentile-table row (or 0 or 1) lies between the two scores, and the
  probability only by what the spline's slope allows over that distance (:class:`PostProcessing`); a sanity
  failure (``-1``) and NaN must be answered identically;
- log lines, when both endpoints record them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .tolerances import Tolerance, tolerance_for

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "endpoint"
MODEL_DIR = FIXTURE_DIR / "model"
FEATURES = FIXTURE_DIR / "features.json"
PORT_MODULE = "lightning_port.serving.inference"
ANSWER_KEYS = ("score-percentile", "legacy-score", "ProbabilityScore")
ERROR_CHARS = 500  # the recorder kept the first 500 characters of str(exception)
STAGES = ("input_fn", "predict_fn", "output_fn")
SIGMOID_CLAMP_GAP = 1.0 / (1.0 + math.exp(25.0))  # the legacy answers 1 above z = 25: 1 - sigmoid(25)


class PortUnavailable(RuntimeError):
    """The port's endpoint module cannot be imported (on a branch without it)."""


@dataclass
class Outcome:
    ok: bool
    answer: dict | None = None
    prediction: str | None = None  # repr of predict_fn's value: "-1", "nan", "0.5432984828948975"
    log: list[str] | None = None  # None: the endpoint does not record its log lines
    stage: str | None = None
    error_type: str | None = None
    error: str | None = None

    @classmethod
    def from_record(cls, rec: dict) -> Outcome:
        if rec.get("ok"):
            return cls(True, answer=rec.get("answer"), prediction=rec.get("prediction"), log=rec.get("log"))
        return cls(False, log=rec.get("log"), stage=rec.get("stage"), error_type=rec.get("error_type"),
                   error=rec.get("error"))

    def to_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def score(self) -> float | None:
        """predict_fn's value as a float (NaN included; from the answer's legacy-score when the prediction's repr is
        not a plain number), None for a sanity failure (-1) or a crash."""
        if not self.ok or self.kind == "sanity":
            return None
        for text in (self.prediction, self.fields().get("legacy-score")):
            value = _float(text)
            if value is not None:
                return value
        return None

    @property
    def kind(self) -> str:
        """``score``, ``nan``, ``sanity`` (-1), or ``crash:<stage>:<type>`` (from the answer's legacy-score)."""
        if not self.ok:
            return f"crash:{self.stage}:{self.error_type}"
        text = self.fields().get("legacy-score", self.prediction)
        if text == "-1":
            return "sanity"
        value = _float(text)
        return "nan" if value is not None and math.isnan(value) else "score"

    def fields(self) -> dict[str, str]:
        """The answer's three strings (empty when not an answer of the recorded shape)."""
        try:
            return dict(self.answer["predictions"][0])
        except (TypeError, KeyError, IndexError):
            return {}


class Endpoint:
    """One endpoint under test: its handler module (the four functions) and the model ``model_fn`` returned."""

    def __init__(self, name: str, functions: Any, model: Any, capture: Any = None):
        self.name = name
        self.functions = functions
        self.model = model
        self.capture = capture  # a context manager factory whose value has ``.lines`` (the reference's log)

    def replay(self, body: Any, content_type: Any, accept: Any) -> Outcome:
        import contextlib

        f = self.functions
        stage = "input_fn"
        cm = self.capture() if self.capture is not None else contextlib.nullcontext(None)
        with cm as log:
            try:
                data = f.input_fn(body, content_type)
                stage = "predict_fn"
                prediction = f.predict_fn(data, self.model)
                stage = "output_fn"
                answer = f.output_fn(prediction, accept)
                out = Outcome(True, answer=answer, prediction=repr(prediction))
            except Exception as exc:  # noqa: BLE001 - the crash is the outcome being compared
                out = Outcome(False, stage=stage, error_type=type(exc).__name__, error=str(exc)[:ERROR_CHARS])
        out.log = list(log.lines) if log is not None else None
        return out

    def replay_record(self, rec: dict) -> Outcome:
        return self.replay(rec["body"], rec.get("content_type"), rec.get("accept"))


def reference_endpoint(model_dir: str | Path = MODEL_DIR, features: str | Path | None = FEATURES) -> Endpoint:
    """The reproduced legacy handler on ``model_dir`` (``torch.set_num_threads(1)`` is the handler's own)."""
    from reference import pytorch_inference_handler as H

    return Endpoint("reference", H, H.model_fn(model_dir, features=features), capture=H.captured_log)


def port_module():
    import importlib

    try:
        return importlib.import_module(PORT_MODULE)
    except ImportError as exc:
        raise PortUnavailable(f"{PORT_MODULE} not importable: {exc}") from None


def port_endpoint(model_dir: str | Path = MODEL_DIR, backend: str = "onnx") -> Endpoint:
    """The port's endpoint (issue 19 contract): ``model_fn(model_dir, backend=...)``; :class:`PortUnavailable`
    when the module is absent."""
    mod = port_module()
    return Endpoint(f"port:{backend}", mod, mod.model_fn(str(model_dir), backend=backend))


def make_endpoint(name: str, model_dir: str | Path = MODEL_DIR, features: str | Path | None = FEATURES) -> Endpoint:
    """``reference``, ``port`` (ONNX Runtime), ``port:onnx`` or ``port:eager``."""
    if name == "reference":
        return reference_endpoint(model_dir, features)
    if name in ("port", "port:onnx", "port:eager"):
        return port_endpoint(model_dir, "eager" if name.endswith("eager") else "onnx")
    raise ValueError(f"unknown endpoint {name!r}: expected reference, port, port:onnx or port:eager")


def read_jsonl(path: str | Path, what: str = "records") -> list[Any]:
    """The JSON values of a JSON-lines file (blank lines skipped); ValueError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} {path}: line {n} is not JSON ({exc.msg} at column {exc.colno})") from None
    return out


def fixture_records(fixture_dir: str | Path = FIXTURE_DIR) -> list[tuple[dict, dict]]:
    """(request record, response record) pairs of the recorded fixtures, matched by id."""
    fixture_dir = Path(fixture_dir)
    reqs = read_jsonl(fixture_dir / "requests.jsonl", "requests")
    resps = {r["id"]: r for r in read_jsonl(fixture_dir / "responses.jsonl", "responses")}
    return [(q, resps[q["id"]]) for q in reqs]


@dataclass
class PostProcessing:
    """What the boundary rules need from the model folder: the percentile table's scores and the spline."""

    table_scores: np.ndarray
    spline: Any  # scipy BSpline (extrapolate=False) of bspline_parameters.json
    slope: Any  # its derivative

    @classmethod
    def from_model_dir(cls, model_dir: str | Path = MODEL_DIR) -> PostProcessing:
        from scipy.interpolate import BSpline

        from reference import safe_pickle

        model_dir = Path(model_dir)
        table = safe_pickle.load(model_dir / "percentile_score.pkl", "percentile table")
        params = json.loads((model_dir / "bspline_parameters.json").read_text())
        spline = BSpline(np.asarray(params["knots"], float), np.asarray(params["coefficients"], float),
                         int(params["degree"]), extrapolate=False)
        return cls(np.asarray([float(r[0]) for r in table]), spline, spline.derivative())

    def rows_between(self, a: float, b: float) -> int:
        """Table rows (and the 0 / 1 clamps) with a score in [min(a, b), max(a, b)]."""
        lo, hi = min(a, b), max(a, b)
        n = int(np.count_nonzero((self.table_scores >= lo) & (self.table_scores <= hi)))
        return n + int(lo <= 0.0 <= hi) + int(lo <= 1.0 <= hi)

    def probability_slack(self, a: float, b: float) -> float:
        """How far ProbabilityScore may move when the raw score moves from a to b: |b - a| times twice the
        largest |d sigmoid(s(x)) / dx| at the ends and the middle; plus the spline's own float64 rounding (Cox-de
        Boor sums degree + 1 products of coefficients: a few roundings of max|c| each, which exp() turns into a
        relative error of p) and that of the sigmoid; plus the jump to 1 above z = 25 when the interval reaches
        it."""
        lo, hi = min(a, b), max(a, b)
        xs = np.array([lo, (lo + hi) / 2, hi])
        z = self.spline(xs)
        if np.any(~np.isfinite(z)):
            return math.inf
        p = 1.0 / (1.0 + np.exp(-z))
        dp = np.abs(p * (1 - p) * self.slope(xs))
        eps = np.finfo(float).eps
        z_rounding = 4 * (self.spline.k + 1) * eps * float(np.max(np.abs(self.spline.c)))
        slack = (2.0 * float(dp.max()) * (hi - lo) + float(np.max(p * (1 - p))) * 2 * z_rounding
                 + 8 * eps * float(p.max()))
        if np.any(z >= 24.0):
            slack += SIGMOID_CLAMP_GAP
        return slack


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    score_diff: float | None = None  # |legacy-score difference| of two scored answers
    identical: bool = False  # every answer string (and the crash) identical
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def answer_shape_problems(answer: Any) -> list[str]:
    """The recorded answer shape: {"predictions": [{three string values, in order}]}."""
    if not isinstance(answer, dict) or list(answer) != ["predictions"]:
        return [f"answer is not {{'predictions': [...]}}: {str(answer)[:120]}"]
    preds = answer["predictions"]
    if not isinstance(preds, list) or len(preds) != 1 or not isinstance(preds[0], dict):
        return [f"answer['predictions'] is not a list of one dict: {str(preds)[:120]}"]
    if tuple(preds[0]) != ANSWER_KEYS:
        return [f"answer keys {list(preds[0])}, expected {list(ANSWER_KEYS)} in that order"]
    bad = [k for k, v in preds[0].items() if not isinstance(v, str)]
    return [f"answer value(s) not strings: {', '.join(f'{k}={preds[0][k]!r}' for k in bad)}"] if bad else []


def compare_outcomes(got: Outcome, want: Outcome, post: PostProcessing, tol: Tolerance | None = None,
                     compare_log: bool = True) -> Verdict:
    """``got`` held against ``want`` by the rules in the module docstring."""
    tol = tol or tolerance_for("endpoint.legacy_score")
    v = Verdict()
    if compare_log and got.log is not None and want.log is not None and got.log != want.log:
        v.problems.append(f"log lines {got.log} != {want.log}")
    if got.ok != want.ok:
        def desc(o: Outcome) -> str:
            return f"answer {o.fields() or o.answer}" if o.ok else f"{o.error_type} in {o.stage}: {str(o.error)[:200]}"

        v.problems.append(f"{'answered' if got.ok else 'crashed'} where the other "
                          f"{'answered' if want.ok else 'crashed'}: {desc(got)} vs {desc(want)}")
        return v
    if not got.ok:
        for key in ("stage", "error_type", "error"):
            a, b = getattr(got, key), getattr(want, key)
            if key == "error":
                a, b = (a or "")[:ERROR_CHARS], (b or "")[:ERROR_CHARS]
            if a != b:
                v.problems.append(f"crash {key} {a!r} != {b!r}")
        v.identical = not v.problems
        return v

    v.problems += answer_shape_problems(got.answer)
    if v.problems:
        return v
    if got.prediction is not None and got.prediction != "-1" and _float(got.prediction) is None:
        v.problems.append(f"predict_fn returned {got.prediction}: the contract is the int -1 or a Python float")
    g, w = got.fields(), want.fields()
    if g == w:
        v.identical = True
    gk, wk = got.kind, want.kind
    if gk != wk or wk in ("sanity", "nan"):
        if gk != wk:
            v.problems.append(f"{gk} answer where {wk} was expected: {g} vs {w}")
        elif g != w:
            v.problems.append(f"{wk} answer strings differ: {g} vs {w}")
        return v
    gs, ws = _float(g["legacy-score"]), _float(w["legacy-score"])
    if gs is None or ws is None:
        v.problems.append(f"legacy-score not a number: {g['legacy-score']!r} vs {w['legacy-score']!r}")
        return v
    if got.score is not None and got.score != gs:
        v.problems.append(f"legacy-score {g['legacy-score']!r} is not predict_fn's value {got.prediction}")
    v.score_diff = abs(gs - ws)
    if v.score_diff > tol.atol + tol.rtol * abs(ws):
        v.problems.append(f"legacy-score {g['legacy-score']} vs {w['legacy-score']}: |diff| {v.score_diff:.3g} > "
                          f"atol {tol.atol:g} + rtol {tol.rtol:g}·|expected| ({tol.reason})")
    if g["legacy-score"] == w["legacy-score"]:
        for key in ("score-percentile", "ProbabilityScore"):
            if g[key] != w[key]:
                v.problems.append(f"{key} {g[key]!r} != {w[key]!r} with the same legacy-score {g['legacy-score']}")
        return v
    if g["score-percentile"] != w["score-percentile"]:
        rows = post.rows_between(gs, ws)
        if rows:
            v.notes.append(f"score-percentile {g['score-percentile']} vs {w['score-percentile']}: {rows} table row(s) "
                           f"between the scores {gs!r} and {ws!r} (fp32 rounding crossed them)")
        else:
            v.problems.append(f"score-percentile {g['score-percentile']!r} != {w['score-percentile']!r} and no "
                              f"percentile-table row lies between the scores {gs!r} and {ws!r}")
    if g["ProbabilityScore"] != w["ProbabilityScore"]:
        gp, wp = _float(g["ProbabilityScore"]), _float(w["ProbabilityScore"])
        slack = post.probability_slack(gs, ws)
        if gp is None or wp is None or not (abs(gp - wp) <= slack):
            v.problems.append(f"ProbabilityScore {g['ProbabilityScore']!r} vs {w['ProbabilityScore']!r}: more than "
                              f"the spline allows for the score moving {v.score_diff:.3g} ({slack:.3g})")
    return v


def summarize_kinds(outcomes: Iterable[Outcome]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        k = o.kind.split(":")[0]
        out[k] = out.get(k, 0) + 1
    return out
