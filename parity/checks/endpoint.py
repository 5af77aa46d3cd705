"""The `endpoint` category (issue 19): the SageMaker handler contract, request in, the three strings out.

- ``endpoint.reference_vs_recorded``: the reproduced legacy handler (``reference/pytorch_inference_handler.py``) on
  every recorded request of ``parity/fixtures/endpoint`` against the genuine handler's recorded answer, crash and
  log lines;
- ``endpoint.reference_drawn_contract``: the reproduced handler on hypothesis-drawn requests
  (:mod:`parity.endpoint_strategies`) answers, fails the sanity check or crashes (stage, exception type) as
  legacy-endpoint.md §3-§7 say for what the request holds;
- ``endpoint.port_<backend>_vs_recorded``: the port's endpoint (``lightning_port.serving.inference``, backends
  ``onnx`` and ``eager``) against the recorded answers;
- ``endpoint.port_<backend>_vs_reference_drawn``: the port against the reproduced handler on drawn requests, valid
  ones and mutations that must crash.

Answers are compared by :func:`parity.endpoint.compare_outcomes` (legacy-score to fp32 rounding, the other two
strings equal whenever legacy-score is, crashes by stage, type and message). Without the port's module the port
checks fail with "not run: lightning_port.serving.inference not importable" (never a pass).

Tests plant endpoints through ``ctx.extra["endpoint_factories"]`` (``{"reference": f, "port:onnx": f, ...}``, each
``f()`` returning a :class:`parity.endpoint.Endpoint`).
"""

from __future__ import annotations

import traceback

from hypothesis import given

from .. import endpoint as E
from ..profiles import check_settings
from ..report import CheckRecord
from ..tolerances import tolerance_for
from .base import ParityFailure, RunContext

MODEL = "single:endpoint-fixture"  # the recorded model folder: the production shape with 413 engineered features
BACKENDS = ("onnx", "eager")
DRAWN_WEIGHT = 1.0  # examples per drawn check: the profile's base count
MAX_IDS_LISTED = 20


def _factory(ctx: RunContext, name: str):
    made = ctx.extra.get("endpoint_factories", {})
    if name in made:
        return made[name]
    return lambda: E.make_endpoint(name)


def _cache(ctx: RunContext) -> dict:
    return ctx.extra.setdefault("endpoint_cache", {})


def _endpoint(ctx: RunContext, name: str) -> E.Endpoint:
    """One endpoint per name per run (model_fn once)."""
    cache = _cache(ctx)
    if name not in cache:
        cache[name] = _factory(ctx, name)()
    return cache[name]


def _post(ctx: RunContext) -> E.PostProcessing:
    cache = _cache(ctx)
    if "post" not in cache:
        cache["post"] = E.PostProcessing.from_model_dir(E.MODEL_DIR)
    return cache["post"]


def _record(name: str, notes: str) -> CheckRecord:
    return CheckRecord.new(name, "endpoint", MODEL, tolerance_for("endpoint.legacy_score"), notes=notes)


def _not_run(rec: CheckRecord, exc: Exception) -> list[CheckRecord]:
    rec.fail(f"not run: {exc}" if isinstance(exc, E.PortUnavailable) else
             f"not run: {E.PORT_MODULE}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    rec.notes = (rec.notes + "; " if rec.notes else "") + rec.failures[-1]
    return [rec]


def _against_recorded(rec: CheckRecord, ep: E.Endpoint, post: E.PostProcessing) -> CheckRecord:
    pairs = E.fixture_records()
    bad: list[str] = []
    identical = exact_scores = scored = 0
    notes: list[str] = []
    for req, resp in pairs:
        want = E.Outcome.from_record(resp)
        got = ep.replay_record(req)
        v = E.compare_outcomes(got, want, post)
        rec.add_value(v.score_diff or 0.0, (v.score_diff or 0.0) / max(abs(want.score or 0.0), 1e-30)
                      if v.score_diff else 0.0)
        identical += v.identical
        if want.kind == "score":
            scored += 1
            exact_scores += got.prediction == want.prediction
        notes += [f"request {req['id']} ({req['kind']}): {n}" for n in v.notes]
        if not v.passed:
            bad.append(f"{req['id']} ({req['kind']})")
            rec.fail(f"request {req['id']} ({req['kind']}): " + "; ".join(v.problems))
    if bad:
        rec.failures.insert(0, f"{len(bad)} of {len(pairs)} recorded requests answered differently: "
                               + ", ".join(bad[:MAX_IDS_LISTED]) + (" ..." if len(bad) > MAX_IDS_LISTED else ""))
    rec.notes = (f"{ep.name}: {identical} of {len(pairs)} answers identical to the recording; "
                 f"{exact_scores} of {scored} scores bit-identical (the others within fp32 rounding)"
                 + ("; " + "; ".join(notes[:3]) if notes else ""))
    return rec


def check_endpoint_reference(ctx: RunContext) -> list[CheckRecord]:
    """The reproduced legacy handler vs every recorded request (answer strings, crashes, log lines)."""
    rec = _record("endpoint.reference_vs_recorded", "")
    try:
        _against_recorded(rec, _endpoint(ctx, "reference"), _post(ctx))
    except Exception as e:  # noqa: BLE001 - a crash of the harness is a failed check, with its traceback
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return [rec]


def check_endpoint_port_recorded(ctx: RunContext) -> list[CheckRecord]:
    """The port's endpoint, each backend, vs every recorded request."""
    out = []
    for backend in BACKENDS:
        rec = _record(f"endpoint.port_{backend}_vs_recorded", "")
        try:
            ep = _endpoint(ctx, f"port:{backend}")
        except Exception as e:  # noqa: BLE001 - absent or broken port: the check fails, saying why
            out += _not_run(rec, e)
            continue
        try:
            out.append(_against_recorded(rec, ep, _post(ctx)))
        except Exception as e:  # noqa: BLE001
            rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
            out.append(rec)
    return out


def _drawn(rec: CheckRecord, ctx: RunContext, body) -> CheckRecord:
    """Run ``body(recipe, request) -> list of problems`` as a hypothesis property over drawn requests."""
    from .. import endpoint_strategies as S

    builder = _cache(ctx).get("builder")
    if builder is None:
        builder = _cache(ctx)["builder"] = S.RequestBuilder.from_files(E.MODEL_DIR, E.FEATURES)

    @check_settings(ctx.profile, DRAWN_WEIGHT, shrink=ctx.shrink)
    @given(recipe=S.request_recipes(builder))
    def prop(recipe):
        req = builder.build(recipe)
        problems = body(req)
        if problems:
            raise ParityFailure(f"request recipe({recipe.short()}), expected {req.expect}: " + "; ".join(problems))

    try:
        prop()
    except ParityFailure as e:
        rec.failures.insert(0, "minimal failing example:\n" + str(e)[:4000])
        del rec.failures[5:]
        rec.status = "failed"
    except Exception as e:  # noqa: BLE001
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return rec


def check_endpoint_reference_drawn(ctx: RunContext) -> list[CheckRecord]:
    """The reproduced handler on drawn requests: the outcome legacy-endpoint.md predicts for each."""
    from ..endpoint_strategies import outcome_matches

    rec = _record("endpoint.reference_drawn_contract",
                  "drawn requests (parity/endpoint_strategies.py); outcome kind = what legacy-endpoint.md §3-§7 predict")
    kinds: dict[str, int] = {}
    try:
        ref = _endpoint(ctx, "reference")
    except Exception as e:  # noqa: BLE001
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
        return [rec]

    def body(req):
        got = ref.replay_record(req.record())
        kinds[got.kind] = kinds.get(got.kind, 0) + 1
        rec.add_value(0.0)
        if not outcome_matches(req.expect, got.kind):
            text = f"the reference gave {got.kind}" + (f" ({got.error})" if got.error else "")
            rec.fail(text)
            return [text]
        return []

    _drawn(rec, ctx, body)
    rec.notes += "; outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    return [rec]


def check_endpoint_port_drawn(ctx: RunContext) -> list[CheckRecord]:
    """The port's endpoint, each backend, vs the reproduced handler on drawn requests (valid and crashing)."""
    out = []
    for backend in BACKENDS:
        rec = _record(f"endpoint.port_{backend}_vs_reference_drawn",
                      "drawn requests (parity/endpoint_strategies.py), valid ones and mutations that must crash")
        try:
            port = _endpoint(ctx, f"port:{backend}")
        except Exception as e:  # noqa: BLE001
            out += _not_run(rec, e)
            continue
        try:
            ref, post = _endpoint(ctx, "reference"), _post(ctx)
        except Exception as e:  # noqa: BLE001
            rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
            out.append(rec)
            continue
        stats = {"identical": 0, "examples": 0}

        def body(req, port=port, ref=ref, post=post, rec=rec, stats=stats):
            want = ref.replay_record(req.record())
            got = port.replay_record(req.record())
            v = E.compare_outcomes(got, want, post, compare_log=False)
            rec.add_value(v.score_diff or 0.0)
            stats["examples"] += 1
            stats["identical"] += v.identical
            if not v.passed:
                rec.fail(f"request recipe({req.recipe.short()}): " + "; ".join(v.problems))
            return v.problems

        _drawn(rec, ctx, body)
        rec.notes += f"; {stats['identical']} of {stats['examples']} answers identical strings"
        out.append(rec)
    return out
