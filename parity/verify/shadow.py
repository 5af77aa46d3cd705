"""The shadow comparison (issue 19 item 4): replay a request log through an endpoint and compare with the legacy
endpoint's captured answers.

::

    tsa-verify MODEL_DIR --requests R.jsonl --responses S.jsonl [--endpoint port|port:onnx|port:eager|reference]
               [--out reports/shadow] [--thresholds 0.9,0.95,0.99,0.999] [--score-thresholds 0.5]
               [--features PATH] [--top N]

``MODEL_DIR`` is the legacy endpoint's model folder. Request logs: the fixture record format (``{id, content_type,
accept, body}``, ``body`` the exact request string) or plain JSONL of request bodies (one JSON value per line, sent
as that line's text with content type and accept ``application/json``). Responses: the fixture format (``{id, ok,
answer | stage/error_type/error}``) or plain JSONL of answer dicts (``{"predictions": [...]}``). Matched by id when
both files carry ids, else by line order; a count mismatch is refused in one line.

Every request is replayed through the endpoint (the port by default; ``--endpoint reference`` is the reproduced
legacy handler) and held against its captured answer by :func:`parity.endpoint.compare_outcomes`. The report
(``report.md``, ``report.json``) gives: the per-request |legacy-score difference| (distribution and the worst
requests), percentile and probability string equality counts, refusal agreement (exception types, sanity
failures), decisions flipped at the percentile and score thresholds, and the drift of the two score distributions
(PSI on 10 bins at the captured scores' deciles, the two-sample KS statistic and its asymptotic p-value), then a
verdict with the tolerances of :mod:`parity.tolerances`. Exit 0 pass, 1 beyond tolerance, 2 refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import endpoint as E
from ..tolerances import SHADOW_KS_ALPHA, SHADOW_PSI_EPS, SHADOW_PSI_MAX, tolerance_for

PROG = "tsa-verify"
EXIT_PASS, EXIT_FAIL, EXIT_REFUSED = 0, 1, 2
DEFAULT_PERCENTILE_THRESHOLDS = (0.9, 0.95, 0.99, 0.999)
DEFAULT_SCORE_THRESHOLDS = (0.5,)
PSI_BINS = 10
DIFF_BINS = (0.0, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # |score difference| histogram edges
RECORD_KEYS = {"id", "body"}


class ShadowError(ValueError):
    """A refused input: one line, exit 2."""


# --- reading the logs ---------------------------------------------------------------------------------------------
@dataclass
class Request:
    id: Any
    body: Any
    content_type: Any = "application/json"
    accept: Any = "application/json"
    kind: str = ""


def read_requests(path: str | Path) -> tuple[list[Request], bool]:
    """The requests of ``path`` and whether they carry ids (record format)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ShadowError(f"requests {path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ShadowError(f"requests {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ShadowError(f"requests {path}: no requests in it")
    values = []
    for n, line in lines:
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ShadowError(f"requests {path}: line {n} is not JSON ({exc.msg} at column {exc.colno})") from None
    records = [isinstance(v, dict) and v.keys() >= RECORD_KEYS for v in values]
    if all(records):
        out = []
        for (n, _), v in zip(lines, values):
            if not isinstance(v["body"], str):
                raise ShadowError(f"requests {path}: line {n}: 'body' must be the request string as sent, got "
                                  f"{type(v['body']).__name__}")
            out.append(Request(v["id"], v["body"], v.get("content_type", "application/json"),
                               v.get("accept", "application/json"), str(v.get("kind", ""))))
        _unique_ids(path, "requests", [r.id for r in out])
        return out, True
    if any(records):
        n = lines[records.index(not records[0])][0]
        raise ShadowError(f"requests {path}: line {n} mixes the two formats (records with id and body, and plain "
                          "request bodies)")
    return [Request(i, line) for i, (_, line) in enumerate(lines)], False


def _unique_ids(path: Path, what: str, ids: list) -> None:
    seen, dup = set(), []
    for i in ids:
        key = json.dumps(i)
        if key in seen:
            dup.append(i)
        seen.add(key)
    if dup:
        raise ShadowError(f"{what} {path}: id(s) repeated: {', '.join(map(str, dup[:10]))}")


def _answer_outcome(path: Path, n: int, answer: Any) -> E.Outcome:
    problems = E.answer_shape_problems(answer)
    if problems:
        raise ShadowError(f"responses {path}: line {n}: {problems[0]}")
    score = answer["predictions"][0]["legacy-score"]
    try:
        value = float(score)
    except ValueError:
        raise ShadowError(f"responses {path}: line {n}: legacy-score {score!r} is not a number") from None
    return E.Outcome(True, answer=answer, prediction="-1" if score == "-1" else repr(value))


def read_responses(path: str | Path) -> tuple[list[tuple[Any, E.Outcome]], bool]:
    """(id, outcome) per line (ids None for plain answers) and whether they carry ids."""
    path = Path(path)
    try:
        values = E.read_jsonl(path, "responses")
    except ValueError as exc:
        raise ShadowError(str(exc)) from None
    if not values:
        raise ShadowError(f"responses {path}: no responses in it")
    recs = [isinstance(v, dict) and "ok" in v and "id" in v for v in values]
    if all(recs):
        out = []
        for n, v in enumerate(values, 1):
            if v["ok"]:
                if "answer" not in v:
                    raise ShadowError(f"responses {path}: record {n} (id {v['id']}): ok but no 'answer'")
                o = _answer_outcome(path, n, v["answer"])
                o.prediction = v.get("prediction", o.prediction)
                o.log = v.get("log")
            else:
                missing = [k for k in ("stage", "error_type", "error") if k not in v]
                if missing:
                    raise ShadowError(f"responses {path}: record {n} (id {v['id']}): a failure without "
                                      f"{', '.join(missing)}")
                o = E.Outcome.from_record(v)
            out.append((v["id"], o))
        _unique_ids(path, "responses", [i for i, _ in out])
        return out, True
    if any(recs):
        raise ShadowError(f"responses {path}: line {recs.index(not recs[0]) + 1} mixes the two formats (records "
                          "with id and ok, and plain answer dicts)")
    return [(None, _answer_outcome(path, n, v)) for n, v in enumerate(values, 1)], False


def match(requests: list[Request], req_ids: bool, responses: list[tuple[Any, E.Outcome]], resp_ids: bool,
          req_path: Path, resp_path: Path) -> list[tuple[Request, E.Outcome]]:
    """Pairs by id when both carry ids, else by line order (the counts must agree)."""
    if req_ids and resp_ids:
        by_id = {json.dumps(i): o for i, o in responses}
        req_keys = {json.dumps(r.id) for r in requests}
        lacking = [r.id for r in requests if json.dumps(r.id) not in by_id]
        extra = [i for i, _ in responses if json.dumps(i) not in req_keys]
        if lacking or extra:
            parts = []
            if lacking:
                parts.append(f"{len(lacking)} request id(s) without a response ({', '.join(map(str, lacking[:10]))})")
            if extra:
                parts.append(f"{len(extra)} response id(s) without a request ({', '.join(map(str, extra[:10]))})")
            raise ShadowError(f"{req_path} and {resp_path} do not match: " + "; ".join(parts))
        return [(r, by_id[json.dumps(r.id)]) for r in requests]
    if len(requests) != len(responses):
        raise ShadowError(f"{req_path} has {len(requests)} requests but {resp_path} has {len(responses)} responses "
                          "(matched by line order, the counts must agree)")
    return [(r, o) for r, (_, o) in zip(requests, responses)]


# --- drift statistics -----------------------------------------------------------------------------------------------
def psi(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS, eps: float = SHADOW_PSI_EPS) -> dict:
    """Population stability index of ``actual`` against ``expected``: ``bins`` bins at the deciles of ``expected``,
    each edge halfway between the two sorted ``expected`` values around the k-th decile (the ``ceil(k n / bins)``-th
    and the next; equal edges merged, outer bins open, bins right-closed), so that rounding-level moves of a score do
    not cross an edge; shares per bin with ``eps`` in place of an empty bin's share; PSI = sum (a - e) ln(a / e)."""
    expected, actual = np.asarray(expected, float), np.asarray(actual, float)
    if not len(expected) or not len(actual):
        return {"psi": math.nan, "edges": [], "expected_share": [], "actual_share": []}
    srt = np.sort(expected)
    n = len(srt)
    if n < 2:
        edges = np.unique(srt)
    else:
        lower = np.array([min(n - 2, max(0, math.ceil(k * n / bins) - 1)) for k in range(1, bins)])
        edges = np.unique((srt[lower] + srt[lower + 1]) / 2)
    # bin i holds x with edges[i-1] < x <= edges[i] (right-closed), first bin x <= edges[0], last x > edges[-1]
    e_counts = np.bincount(np.searchsorted(edges, expected, side="left"), minlength=len(edges) + 1)
    a_counts = np.bincount(np.searchsorted(edges, actual, side="left"), minlength=len(edges) + 1)
    e_share = np.maximum(e_counts / len(expected), eps)
    a_share = np.maximum(a_counts / len(actual), eps)
    value = float(np.sum((a_share - e_share) * np.log(a_share / e_share)))
    return {"psi": value, "edges": edges.tolist(), "expected_share": e_share.tolist(),
            "actual_share": a_share.tolist()}


def ks_2samp(a: np.ndarray, b: np.ndarray) -> dict:
    """Two-sample Kolmogorov-Smirnov: D = sup |F_a - F_b| over the pooled sample, and the asymptotic p-value
    Q(sqrt(n m / (n + m)) D), Q(l) = 2 sum_k (-1)^(k-1) exp(-2 k^2 l^2) (Kolmogorov's limit distribution)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    if not len(a) or not len(b):
        return {"statistic": math.nan, "pvalue": math.nan, "n": [len(a), len(b)]}
    pooled = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, pooled, side="right") / len(a)
    cdf_b = np.searchsorted(b, pooled, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    lam = math.sqrt(len(a) * len(b) / (len(a) + len(b))) * d
    return {"statistic": d, "pvalue": kolmogorov_sf(lam), "n": [len(a), len(b)],
            "method": "asymptotic (Kolmogorov distribution)"}


def kolmogorov_sf(lam: float) -> float:
    if lam <= 0:
        return 1.0
    if lam < 0.2:  # the alternating series converges slowly here; Q is 1 to double precision below ~0.2
        return 1.0
    total, k = 0.0, 1
    while True:
        term = 2.0 * (-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-17 or k > 200:
            break
        k += 1
    return min(1.0, max(0.0, total))


# --- the comparison -------------------------------------------------------------------------------------------------
@dataclass
class Options:
    model_dir: Path
    requests: Path
    responses: Path
    endpoint: str = "port"
    out: Path = Path("reports/shadow")
    thresholds: tuple[float, ...] = DEFAULT_PERCENTILE_THRESHOLDS
    score_thresholds: tuple[float, ...] = DEFAULT_SCORE_THRESHOLDS
    features: Path | None = None
    top: int = 10


@dataclass
class Row:
    id: Any
    kind: str
    got: E.Outcome
    want: E.Outcome
    verdict: E.Verdict = field(default_factory=E.Verdict)


def _features(opts: Options) -> tuple[Path | None, str]:
    if (opts.model_dir / "features.json").is_file():
        return None, f"{opts.model_dir / 'features.json'}"
    if opts.features is not None:
        return opts.features, str(opts.features)
    return E.FEATURES, f"{E.FEATURES} (the legacy params.py lists; no features.json in the model folder)"


def _endpoint(opts: Options, features: Path | None) -> E.Endpoint:
    if not opts.model_dir.is_dir():
        raise ShadowError(f"model folder {opts.model_dir}: not a folder")
    try:
        if opts.endpoint == "reference":
            return E.reference_endpoint(opts.model_dir, features)
        return E.make_endpoint(opts.endpoint, opts.model_dir)
    except E.PortUnavailable as exc:
        raise ShadowError(f"endpoint {opts.endpoint}: {exc}; --endpoint reference replays through the reproduced "
                          "legacy handler") from None
    except ValueError as exc:
        raise ShadowError(str(exc).splitlines()[0]) from None
    except FileNotFoundError as exc:
        raise ShadowError(f"model folder {opts.model_dir}: {exc.filename or exc} missing") from None


def _decisions(rows: list[Row], opts: Options) -> dict:
    """Decision flips: legacy (captured) vs endpoint, over requests both answered."""
    both = [r for r in rows if r.got.ok and r.want.ok]
    out: dict[str, Any] = {"percentile": [], "score": []}
    for t in opts.thresholds:
        flips = []
        for r in both:
            g, w = E._float(r.got.fields().get("score-percentile")), E._float(r.want.fields().get("score-percentile"))
            if g is None or w is None:
                continue
            if (g >= t) != (w >= t):
                flips.append(r.id)
        flagged = sum(1 for r in both if (E._float(r.want.fields().get("score-percentile")) or 0) >= t)
        out["percentile"].append({"threshold": t, "flagged_by_legacy": flagged, "flips": len(flips), "ids": flips})
    for t in opts.score_thresholds:
        flips = []
        for r in both:
            g, w = r.got.score, r.want.score
            g = -1.0 if r.got.kind == "sanity" else g
            w = -1.0 if r.want.kind == "sanity" else w
            if g is None or w is None:
                continue
            if (g >= t) != (w >= t):  # NaN is never at or above a threshold (the legacy's comparisons are False)
                flips.append(r.id)
        flagged = sum(1 for r in both if (r.want.score or -1.0) >= t)
        out["score"].append({"threshold": t, "flagged_by_legacy": flagged, "flips": len(flips), "ids": flips})
    return out


def _refusals(rows: list[Row]) -> dict:
    crash_both = [r for r in rows if not r.got.ok and not r.want.ok]
    same_type = [r for r in crash_both if r.got.error_type == r.want.error_type]
    same_msg = [r for r in crash_both if r.got.error_type == r.want.error_type and
                (r.got.error or "")[:E.ERROR_CHARS] == (r.want.error or "")[:E.ERROR_CHARS]]
    one_side = [r for r in rows if r.got.ok != r.want.ok]
    sanity_both = [r for r in rows if r.got.kind == "sanity" and r.want.kind == "sanity"]
    sanity_one = [r for r in rows if (r.got.kind == "sanity") != (r.want.kind == "sanity") and r.got.ok and r.want.ok]
    nan_both = [r for r in rows if r.got.kind == "nan" and r.want.kind == "nan"]
    nan_one = [r for r in rows if (r.got.kind == "nan") != (r.want.kind == "nan") and r.got.ok and r.want.ok]
    return {
        "crashed_both": len(crash_both), "same_exception_type": len(same_type), "same_message": len(same_msg),
        "crashed_one_side": [{"id": r.id, "endpoint": r.got.kind, "legacy": r.want.kind} for r in one_side],
        "sanity_failures_both": len(sanity_both),
        "sanity_failure_one_side": [{"id": r.id, "endpoint": r.got.kind, "legacy": r.want.kind} for r in sanity_one],
        "nan_both": len(nan_both),
        "nan_one_side": [{"id": r.id, "endpoint": r.got.kind, "legacy": r.want.kind} for r in nan_one],
    }


def run(opts: Options) -> dict:
    requests, req_ids = read_requests(opts.requests)
    responses, resp_ids = read_responses(opts.responses)
    pairs = match(requests, req_ids, responses, resp_ids, opts.requests, opts.responses)
    features, features_from = _features(opts)
    ep = _endpoint(opts, features)
    try:
        post = E.PostProcessing.from_model_dir(opts.model_dir)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ShadowError(f"model folder {opts.model_dir}: percentile table or spline unreadable "
                          f"({str(exc).splitlines()[0]})") from None
    tol = tolerance_for("endpoint.legacy_score")
    t0 = time.perf_counter()
    rows = []
    for req, want in pairs:
        got = ep.replay(req.body, req.content_type, req.accept)
        rows.append(Row(req.id, req.kind, got, want, E.compare_outcomes(got, want, post, tol)))
    seconds = time.perf_counter() - t0

    both_scored = [r for r in rows if r.got.kind == "score" and r.want.kind == "score"]
    diffs = np.array([r.verdict.score_diff for r in both_scored], float)
    answered = [r for r in rows if r.got.ok and r.want.ok]
    fields = [(r.got.fields(), r.want.fields()) for r in answered]
    pct_equal = sum(g.get("score-percentile") == w.get("score-percentile") for g, w in fields)
    prob_equal = sum(g.get("ProbabilityScore") == w.get("ProbabilityScore") for g, w in fields)
    legacy_equal = sum(g.get("legacy-score") == w.get("legacy-score") for g, w in fields)
    worst = sorted(both_scored, key=lambda r: -r.verdict.score_diff)[:opts.top]
    hist = [{"from": 0.0, "to": 0.0, "count": int(np.count_nonzero(diffs == 0))}]  # identical first, then [lo, hi)
    edges = list(DIFF_BINS) + [math.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (diffs > 0) & (diffs >= lo) & (diffs < hi)
        hist.append({"from": lo, "to": hi, "count": int(np.count_nonzero(inside))})
    legacy_scores = np.array([r.want.score for r in both_scored], float)
    port_scores = np.array([r.got.score for r in both_scored], float)
    drift_psi = psi(legacy_scores, port_scores)
    drift_ks = ks_2samp(legacy_scores, port_scores)

    failing = [r for r in rows if not r.verdict.passed]
    reasons = [f"request {r.id}{f' ({r.kind})' if r.kind else ''}: {'; '.join(r.verdict.problems)}"
               for r in failing]
    drift_ok = True
    if len(both_scored) and not (drift_psi["psi"] <= SHADOW_PSI_MAX):
        reasons.append(f"PSI {drift_psi['psi']:.3g} > {SHADOW_PSI_MAX:g}")
        drift_ok = False
    if len(both_scored) and not (drift_ks["pvalue"] >= SHADOW_KS_ALPHA):
        reasons.append(f"KS p-value {drift_ks['pvalue']:.3g} < {SHADOW_KS_ALPHA:g} (D = {drift_ks['statistic']:.3g})")
        drift_ok = False
    verdict = "pass" if not failing and drift_ok else "fail"
    return {
        "verdict": verdict,
        "endpoint": ep.name, "model_dir": str(opts.model_dir), "features": features_from,
        "requests": str(opts.requests), "responses": str(opts.responses),
        "matched_by": "id" if req_ids and resp_ids else "line order",
        "count": len(rows), "seconds": seconds,
        "kinds": {"legacy": E.summarize_kinds(r.want for r in rows), "endpoint": E.summarize_kinds(r.got for r in rows)},
        "tolerances": {"legacy_score": tol.as_dict(), "psi_max": SHADOW_PSI_MAX, "ks_alpha": SHADOW_KS_ALPHA,
                       "psi_empty_bin_eps": SHADOW_PSI_EPS,
                       "percentile_and_probability": "equal strings whenever legacy-score is; otherwise the percentile "
                       "only across a table row between the two scores, the probability within the spline's slope"},
        "score_diff": {
            "requests": len(both_scored),
            "identical": int(np.count_nonzero(diffs == 0)) if len(diffs) else 0,
            "max": float(diffs.max()) if len(diffs) else None,
            "p50": float(np.quantile(diffs, 0.5)) if len(diffs) else None,
            "p90": float(np.quantile(diffs, 0.9)) if len(diffs) else None,
            "p99": float(np.quantile(diffs, 0.99)) if len(diffs) else None,
            "histogram": hist,
            "worst": [{"id": r.id, "kind": r.kind, "legacy": r.want.fields().get("legacy-score"),
                       "endpoint": r.got.fields().get("legacy-score"), "abs_diff": r.verdict.score_diff,
                       "percentile": [r.want.fields().get("score-percentile"), r.got.fields().get("score-percentile")]}
                      for r in worst],
        },
        "strings_equal": {"answered_both": len(answered), "legacy-score": legacy_equal, "score-percentile": pct_equal,
                          "ProbabilityScore": prob_equal, "identical_outcomes": sum(r.verdict.identical for r in rows)},
        "refusals": _refusals(rows),
        "decisions": _decisions(rows, opts),
        "drift": {"scores": len(both_scored), "psi": drift_psi, "ks": drift_ks,
                  "binning": f"{PSI_BINS} bins at the deciles of the captured legacy scores (each edge halfway "
                             "between the two sorted legacy scores around the decile; equal edges merged, outer bins "
                             f"open), empty-bin share {SHADOW_PSI_EPS:g}; over requests both sides scored (no -1, no "
                             "NaN)"},
        "notes": [f"request {r.id}: {n}" for r in rows for n in r.verdict.notes],
        "reasons": reasons,
        "failing_ids": [r.id for r in failing],
        "per_request": [{"id": r.id, "kind": r.kind, "legacy": r.want.kind, "endpoint": r.got.kind,
                         "score_diff": r.verdict.score_diff, "identical": r.verdict.identical,
                         "problems": r.verdict.problems, "notes": r.verdict.notes} for r in rows],
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "0" if x == 0 else f"{x:.3g}"
    return str(x)


def _bin(h: dict) -> str:
    if h["to"] == 0:
        return "0 (identical)"
    lo = "0" if h["from"] == 0 else f"{h['from']:g}"
    return f"({lo}, {h['to']:g})" if h["from"] == 0 else f"[{lo}, {h['to']:g})"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "report.json", out / "report.md"
    jpath.write_text(json.dumps(report, indent=2, default=str))
    s, q, ref, dec, dr = (report["score_diff"], report["strings_equal"], report["refusals"], report["decisions"],
                          report["drift"])
    md = [f"# Shadow comparison: `{report['endpoint']}` vs the captured legacy answers", "",
          f"**Verdict: {report['verdict'].upper()}.** {report['count']} requests from `{report['requests']}`, answers "
          f"from `{report['responses']}` (matched by {report['matched_by']}), model folder `{report['model_dir']}`, "
          f"feature lists `{report['features']}`; replayed in {report['seconds']:.1f} s.", "",
          "| outcome | legacy (captured) | endpoint |", "|---|---:|---:|"]
    kinds = sorted(set(report["kinds"]["legacy"]) | set(report["kinds"]["endpoint"]))
    md += [f"| {k} | {report['kinds']['legacy'].get(k, 0)} | {report['kinds']['endpoint'].get(k, 0)} |" for k in kinds]
    md += ["", "## legacy-score", "",
           f"Both scored: {s['requests']} requests; identical: {s['identical']}; |difference| p50 {_fmt(s['p50'])}, "
           f"p90 {_fmt(s['p90'])}, p99 {_fmt(s['p99'])}, max {_fmt(s['max'])} (tolerance atol "
           f"{report['tolerances']['legacy_score']['atol']:g} + rtol {report['tolerances']['legacy_score']['rtol']:g}"
           f"·|legacy|: {report['tolerances']['legacy_score']['reason']}).", "",
           "| \\|difference\\| | requests |", "|---|---:|"]
    md += [f"| {_bin(h)} | {h['count']} |" for h in s["histogram"]]
    md += ["", "Worst requests:", "", "| id | kind | legacy | endpoint | \\|diff\\| | percentile (legacy / endpoint) |",
           "|---|---|---|---|---:|---|"]
    md += [f"| {w['id']} | {w['kind']} | {w['legacy']} | {w['endpoint']} | {_fmt(w['abs_diff'])} | "
           f"{w['percentile'][0]} / {w['percentile'][1]} |" for w in s["worst"]]
    md += ["", "## Strings", "", f"Over the {q['answered_both']} requests both sides answered: legacy-score equal in "
           f"{q['legacy-score']}, score-percentile in {q['score-percentile']}, ProbabilityScore in "
           f"{q['ProbabilityScore']}; outcomes identical in every field: {q['identical_outcomes']} of {report['count']}.",
           "", "## Refusals", "",
           f"Both crashed: {ref['crashed_both']} (same exception type {ref['same_exception_type']}, same message "
           f"{ref['same_message']}); crashed on one side only: {len(ref['crashed_one_side'])}"
           + (f" ({', '.join(str(x['id']) for x in ref['crashed_one_side'][:20])})" if ref["crashed_one_side"] else "")
           + f". Sanity failures (-1) on both: {ref['sanity_failures_both']}, on one side only: "
           f"{len(ref['sanity_failure_one_side'])}. NaN on both: {ref['nan_both']}, on one side only: "
           f"{len(ref['nan_one_side'])}.", "", "## Decisions flipped", "",
           "| threshold | flagged by the legacy | flips | ids |", "|---|---:|---:|---|"]
    md += [f"| score-percentile >= {d['threshold']:g} | {d['flagged_by_legacy']} | {d['flips']} | "
           f"{', '.join(map(str, d['ids'][:20]))} |" for d in dec["percentile"]]
    md += [f"| legacy-score >= {d['threshold']:g} | {d['flagged_by_legacy']} | {d['flips']} | "
           f"{', '.join(map(str, d['ids'][:20]))} |" for d in dec["score"]]
    ks = dr["ks"]
    md += ["", "## Drift of the score distributions", "",
           f"Over {dr['scores']} scores: PSI {_fmt(dr['psi']['psi'])} (pass <= {report['tolerances']['psi_max']:g}; "
           f"{dr['binning']}); KS D {_fmt(ks['statistic'])}, p-value {_fmt(ks['pvalue'])} (pass >= "
           f"{report['tolerances']['ks_alpha']:g}; {ks.get('method', '')})."]
    if report["notes"]:
        md += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"][:50]]
    if report["reasons"]:
        md += ["", "## Why it fails", ""] + [f"- {r}" for r in report["reasons"][:100]]
    mpath.write_text("\n".join(md) + "\n")
    return jpath, mpath


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    return values


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Shadow comparison: replay a request log through an endpoint "
                                "and compare with the legacy endpoint's captured answers.",
                                epilog="Exit codes: 0 pass, 1 beyond tolerance (see report.md), 2 refused.")
    p.add_argument("model_dir", type=Path, help="the legacy endpoint's model folder (weights, pickles, maps, spline)")
    p.add_argument("--requests", type=Path, required=True, help="request log: records {id, content_type, accept, "
                                                                 "body} or plain JSONL of request bodies")
    p.add_argument("--responses", type=Path, required=True, help="captured answers: records {id, ok, answer | stage, "
                                                                  "error_type, error} or plain JSONL of answer dicts")
    p.add_argument("--endpoint", default="port", choices=("port", "port:onnx", "port:eager", "reference"),
                   help="what replays the requests (default port: lightning_port.serving.inference on ONNX Runtime)")
    p.add_argument("--out", type=Path, default=Path("reports/shadow"), help="folder for report.md and report.json")
    p.add_argument("--thresholds", type=lambda s: _floats(s, "--thresholds"), default=DEFAULT_PERCENTILE_THRESHOLDS,
                   help="score-percentile decision thresholds (default 0.9,0.95,0.99,0.999)")
    p.add_argument("--score-thresholds", type=lambda s: _floats(s, "--score-thresholds"),
                   default=DEFAULT_SCORE_THRESHOLDS, help="legacy-score decision thresholds (default 0.5)")
    p.add_argument("--features", type=Path, help="the feature lists (features.json) when the model folder has none "
                                                 "(default: the legacy params.py lists shipped in parity/fixtures)")
    p.add_argument("--top", type=int, default=10, help="worst requests listed (default 10)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    opts = Options(model_dir=args.model_dir, requests=args.requests, responses=args.responses, endpoint=args.endpoint,
                   out=args.out, thresholds=args.thresholds, score_thresholds=args.score_thresholds,
                   features=args.features, top=args.top)
    try:
        report = run(opts)
        write_report(report, opts.out)
    except ShadowError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # never a traceback for a user; TSA_VERIFY_DEBUG=1 re-raises
        if os.environ.get("TSA_VERIFY_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{prog}: error: internal error ({type(e).__name__}: {msg}); rerun with TSA_VERIFY_DEBUG=1 for details",
              file=sys.stderr)
        return EXIT_REFUSED
    s, q, dr = report["score_diff"], report["strings_equal"], report["drift"]
    print(f"{report['count']} requests through {report['endpoint']} ({report['seconds']:.1f} s): "
          f"{q['identical_outcomes']} identical outcomes; legacy-score: {s['requests']} scored, {s['identical']} "
          f"identical, max |diff| {_fmt(s['max'])}; percentile equal {q['score-percentile']}/{q['answered_both']}, "
          f"probability equal {q['ProbabilityScore']}/{q['answered_both']}")
    flips = ", ".join(f"{d['threshold']:g}: {d['flips']}" for d in report["decisions"]["percentile"])
    print(f"decision flips at percentile {flips}; PSI {_fmt(dr['psi']['psi'])}, KS D {_fmt(dr['ks']['statistic'])} "
          f"(p {_fmt(dr['ks']['pvalue'])})")
    for reason in report["reasons"][:20]:
        print(f"FAIL: {reason}")
    if len(report["reasons"]) > 20:
        print(f"FAIL: ... {len(report['reasons']) - 20} more in report.md")
    print(f"{prog}: {report['verdict'].upper()}: wrote {opts.out / 'report.md'}, {opts.out / 'report.json'}")
    return EXIT_PASS if report["verdict"] == "pass" else EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
