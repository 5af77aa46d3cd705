"""The port endpoint's SageMaker handler functions (lightning_port.serving.inference) against the genuine legacy
handler's recordings (parity/fixtures/endpoint/): every recorded request, both backends, output_fn's crafted
cases, and the model folder checks (hostile pickles, bad artefacts).

The recorded answers are the ground truth. legacy-score is held to float32 rounding (parity/tolerances.py
``endpoint.legacy_score``: the recording ran on another CPU); score-percentile and ProbabilityScore must be the
recorded strings whenever legacy-score is, and otherwise the legacy rules (written out here, with scipy's
BSpline for the spline) applied to the port's score.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from _serving_helpers import (
    MODEL_DIR,
    ROOT,
    endpoint,
    legacy_parse,
    output_cases,
    private_cache,
    requests,
    responses,
)

from lightning_port.serving import inference, scorers
from lightning_port.serving.artifacts import ArtifactError
from parity.tolerances import tolerance_for

TOL = tolerance_for("endpoint.legacy_score")


def run_handler(model, req: dict) -> dict:
    """The request through input_fn / predict_fn / output_fn, recorded as the fixtures record it."""
    stage = "input_fn"
    try:
        data = inference.input_fn(req["body"], req["content_type"])
        stage = "predict_fn"
        prediction = inference.predict_fn(data, model)
        stage = "output_fn"
        answer = inference.output_fn(prediction, req["accept"])
    except Exception as exc:  # noqa: BLE001 - recorded like the fixtures
        return {"ok": False, "stage": stage, "error_type": type(exc).__name__, "error": str(exc)[:500]}
    return {"ok": True, "answer": answer, "prediction": prediction}


def legacy_percentile(x, rows):
    """legacy-endpoint.md §6.1, literally."""
    if x <= 0:
        return 0
    if x >= 1:
        return 1
    lo, hi, res = 0, len(rows) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if rows[mid][0] == x:
            res = mid
            break
        if rows[mid][0] < x:
            lo = mid + 1
        else:
            hi = mid - 1
    res = hi if res is None else res
    return rows[-1][1] if res == len(rows) - 1 else rows[res + 1][1]


def legacy_probability(x, cal):
    """legacy-endpoint.md §6.2 with scipy's BSpline(extrapolate=False), as the legacy built it."""
    from scipy.interpolate import BSpline

    if x <= 0:
        return 0
    if x >= 1:
        return 1
    z = BSpline(np.asarray(cal["knots"]), np.asarray(cal["coefficients"]), cal["degree"], extrapolate=False)(x)
    if z > 25:
        return 1
    return np.exp(z) / (np.exp(z) + 1)


def legacy_format(v):
    text = str(v)
    return str(np.format_float_positional(v)) if "e" in text else text


@pytest.fixture(scope="module")
def fixture_rules():
    with open(MODEL_DIR / "percentile_score.pkl", "rb") as f:
        rows = pickle.load(f)  # the recorded fixture, shipped with the project: a trusted file
    cal = json.loads((MODEL_DIR / "bspline_parameters.json").read_text())
    return rows, cal


@pytest.fixture(params=["onnx", "eager"])
def model(request):
    m = endpoint(request.param)
    inference._LOADED = m  # output_fn post-processes with the model model_fn loaded last
    yield m
    inference._LOADED = None


def test_every_recorded_request_answers_as_recorded(model, fixture_rules):
    rows, cal = fixture_rules
    exact = 0
    for req, rec in zip(requests(), responses(), strict=True):
        got = run_handler(model, req)
        where = f"request {rec['id']} ({rec['kind']}, backend {model.backend})"
        assert got["ok"] == rec["ok"], (where, got, rec)
        if not rec["ok"]:  # the legacy's refusal: same stage, exception type and message
            assert (got["stage"], got["error_type"], got["error"]) == (rec["stage"], rec["error_type"], rec["error"]), where
            continue
        want = rec["answer"]["predictions"][0]
        ans = got["answer"]
        assert list(ans) == ["predictions"] and len(ans["predictions"]) == 1, where
        out = ans["predictions"][0]
        assert list(out) == ["score-percentile", "legacy-score", "ProbabilityScore"], where  # the legacy key order
        assert all(isinstance(v, str) for v in out.values()), where
        recorded = legacy_parse(rec["prediction"])
        pred = got["prediction"]
        if isinstance(recorded, int) or math.isnan(recorded):  # -1 and NaN answers: string for string
            assert type(pred) is type(recorded), where
            assert out == want, where
            continue
        assert type(pred) is float, where
        assert pred == float(np.float32(pred)), where  # a float32 widened
        assert abs(pred - recorded) <= TOL.atol, (where, pred, recorded)
        if out["legacy-score"] == want["legacy-score"]:
            exact += 1
            assert out == want, where
        else:  # another float32 rounding of the score: the legacy rules on the port's score
            assert out["legacy-score"] == legacy_format(pred), where
            assert out["score-percentile"] == legacy_format(legacy_percentile(pred, rows)), where
            assert out["ProbabilityScore"] == legacy_format(legacy_probability(pred, cal)), where
            between = [r[0] for r in rows if min(pred, recorded) <= r[0] <= max(pred, recorded)]
            if not between:  # no table row between the two scores: the same percentile
                assert out["score-percentile"] == want["score-percentile"], where
    assert exact >= 1  # some scores round as the recording's did, bit for bit (of 41: ONNX Runtime 3, eager 5 here)


def test_output_fn_recorded_cases_exactly(model):
    for case in output_cases():
        pred = legacy_parse(case["prediction"])
        assert inference.output_fn(pred, "application/json") == case["answer"], case["prediction"]


def test_output_fn_refuses_other_accepts_and_needs_a_model():
    inference._LOADED = endpoint("eager")
    try:
        for accept in ("text/csv", "application/json; charset=utf-8", None, "*/*"):
            with pytest.raises(ValueError, match="^output format doesn't support ") as err:
                inference.output_fn(0.5, accept)
            assert str(err.value) == f"output format doesn't support {accept}"
    finally:
        inference._LOADED = None
    with pytest.raises(RuntimeError, match="call model_fn first"):
        inference.output_fn(0.5, "application/json")


def test_input_fn_is_the_legacy_one():
    assert inference.input_fn('{"a": NaN, "b": [1]}', "application/json")["b"] == [1]
    assert math.isnan(inference.input_fn(b'{"a": NaN}', "application/json")["a"])  # bytes too, NaN literal kept
    assert inference.input_fn("3", "application/json") == 3
    for ct in ("application/json; charset=utf-8", "text/csv", None, "Application/JSON"):
        with pytest.raises(ValueError, match="not supported by script!$") as err:
            inference.input_fn("{}", ct)
        assert str(err.value) == f"{ct} not supported by script!"
    with pytest.raises(json.JSONDecodeError, match="Expecting property name enclosed in double quotes"):
        inference.input_fn("{x", "application/json")


def test_model_fn_registers_the_model_and_runs_one_thread(tmp_path):
    torch.set_num_threads(2)
    with private_cache():
        m = inference.model_fn(str(MODEL_DIR), backend="eager")
    try:
        assert inference._LOADED is m
        assert torch.get_num_threads() == 1  # legacy: torch.set_num_threads(1)
        assert m.backend == "eager"
        assert "legacy state_dict" in m.source
        req = requests()[0]
        got = run_handler(m, req)
        assert got["ok"]
    finally:
        inference._LOADED = None
        torch.set_num_threads(int(os.environ.get("TSA_TEST_THREADS", "1")))


def test_onnx_and_eager_scores_agree_and_onnx_is_the_default():
    onnx, eager = endpoint("onnx"), endpoint("eager")
    assert onnx.backend == "onnx" and "exported to" in onnx.source
    worst = 0.0
    for req, rec in zip(requests(), responses()):
        if not rec["ok"] or rec["prediction"] in ("-1", "nan"):
            continue
        data = json.loads(req["body"])
        a, b = onnx.predict(data), eager.predict(data)
        worst = max(worst, abs(a - b))
    assert worst <= TOL.atol


def test_forgetting_the_static_deletion_is_caught(monkeypatch):
    # no test that cannot fail: a port that forgot the 266/267 deletion (the fixture's scalers hold absurd values
    # there, 1000 / -12345) scales the dense features from 266 on with the wrong entries and lands far from the
    # recording
    from lightning_port.serving.preprocess import RequestPlan

    m = endpoint("eager")
    plan = RequestPlan(m.folder)
    with open(MODEL_DIR / "preprocessor.pkl", "rb") as f:
        stored = pickle.load(f)  # the recorded fixture: trusted
    monkeypatch.setattr(plan, "static_scale", stored["num_static_scale_"][:413])
    monkeypatch.setattr(plan, "static_min", stored["num_static_min_"][:413])
    req, rec = requests()[0], responses()[0]
    s_good = m.score_many([m.plan.parse(json.loads(req["body"]))])[0]
    s_bad = m.score_many([plan.parse(json.loads(req["body"]))])[0]
    recorded = float(rec["prediction"])
    assert abs(s_good - recorded) <= TOL.atol
    assert abs(s_bad - recorded) > 100 * TOL.atol


# --- the model folder --------------------------------------------------------------------------------
def copy_folder(tmp_path, with_weights=True):
    dest = tmp_path / "model"
    shutil.copytree(MODEL_DIR, dest)
    if not with_weights:
        (dest / "isSmall_0_OrderFeature.pt").unlink()
    return dest


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["preprocessor.pkl", "percentile_score.pkl"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "object array"])
def test_hostile_pickles_are_refused_in_one_line_and_nothing_runs(tmp_path, target, payload):
    folder = copy_folder(tmp_path)
    marker = tmp_path / "pwned"
    if payload == "os.system":
        obj = {"seq_num_scale_": _Exploit(marker)} if target == "preprocessor.pkl" else [_Exploit(marker)]
        data = pickle.dumps(obj)
    elif payload == "builtins.eval":
        code = f"__import__('os').system('touch {marker}')".encode()
        data = b"\x80\x02cbuiltins\neval\nX" + len(code).to_bytes(4, "little") + code + b"\x85R."
    else:
        data = pickle.dumps({"seq_num_scale_": np.array([os.getcwd, 1], dtype=object)}, protocol=2)
    (folder / target).write_bytes(data)
    with pytest.raises(ArtifactError) as err:
        inference.load_endpoint(folder, "eager")
    text = str(err.value)
    assert target in text and "not loaded" in text
    assert "\n" not in text
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_preprocessor_pickles_of_every_protocol_load(tmp_path, protocol):
    folder = copy_folder(tmp_path)
    with open(MODEL_DIR / "preprocessor.pkl", "rb") as f:
        stored = pickle.load(f)  # the recorded fixture: trusted
    stored["bin_map"] = {"a": np.array([0.5, 1.5]), "names": np.array(["x", "yy"]), "n": np.int64(3), "t": (1, "s")}
    (folder / "preprocessor.pkl").write_bytes(pickle.dumps(stored, protocol=protocol))
    m = inference.load_endpoint(folder, "eager")
    np.testing.assert_array_equal(m.folder.scalers.seq_num_scale, stored["seq_num_scale_"])
    np.testing.assert_array_equal(m.folder.scalers.static_scale, np.delete(stored["num_static_scale_"], [266, 267]))


def _write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj))


def _mutate_preprocessor(key, value):
    def apply(folder):
        with open(folder / "preprocessor.pkl", "rb") as f:
            stored = pickle.load(f)  # a copy of the recorded fixture: trusted
        if value is None:
            del stored[key]
        else:
            stored[key] = value(stored[key])
        _write_pickle(folder / "preprocessor.pkl", stored)
    return apply


def _json_edit(name, edit):
    def apply(folder):
        obj = json.loads((folder / name).read_text())
        edit(obj)
        (folder / name).write_text(json.dumps(obj))
    return apply


def _set(key, value):
    def edit(obj):
        obj[key] = value
    return edit


def _cat_map_out_of_range(obj):
    col = next(iter(obj))
    obj[col][next(iter(obj[col]))] = 2405


def _features_without_handler(obj):
    del obj["handler"]


BAD_FOLDERS = [
    ("no preprocessor", lambda f: (f / "preprocessor.pkl").unlink(), "preprocessor.pkl does not exist"),
    ("413-entry static scaler", _mutate_preprocessor("num_static_scale_", lambda a: np.delete(a, [266, 267])),
     "'num_static_scale_' has 413 entries, expected 415; the legacy handler deletes positions 266, 267"),
    ("NaN in a scaler", _mutate_preprocessor("seq_num_min_", lambda a: np.where(np.arange(a.size) == 3, np.nan, a)),
     "'seq_num_min_' holds a non-finite value at index 3"),
    ("missing scaler", _mutate_preprocessor("seq_num_scale_", None), "missing key 'seq_num_scale_'"),
    ("50-entry seq scaler", _mutate_preprocessor("seq_num_scale_", lambda a: a[:50]),
     "'seq_num_scale_' has 50 entries, expected 51"),
    ("not a dict", lambda f: _write_pickle(f / "preprocessor.pkl", [1, 2]), "expected a dict of scaler arrays"),
    ("damaged pickle", lambda f: (f / "preprocessor.pkl").write_bytes(b"\x80\x04junk"), "damaged or not a pickle"),
    ("999-row table", lambda f: _write_pickle(f / "percentile_score.pkl", [[0.1 * i / 999, i / 1000] for i in range(999)]),
     "expected 1000 rows"),
    ("failed R job", _json_edit("bspline_parameters.json", lambda o: o.update(coefficients={}, status="Fail")),
     "'coefficients' is empty (status 'Fail'): the R calibration job that wrote it failed"),
    ("calibration without knots", _json_edit("bspline_parameters.json", lambda o: o.pop("knots")), "missing key 'knots'"),
    ("bad JSON", lambda f: (f / "cat_to_index.json").write_text("{oops"), "cat_to_index.json: not valid JSON"),
    ("index outside the table", _json_edit("cat_to_index.json", _cat_map_out_of_range),
     "maps to 2405; expected an embedding row 0..2404"),
    ("list default", _json_edit("default_value_dict.json", _set("orderDate", [1])),
     "the default of 'orderDate' is a list; expected a string, a number or null"),
    ("no weights", lambda f: (f / "isSmall_0_OrderFeature.pt").unlink(), "no weights (expected isSmall_0_OrderFeature.pt"),
    ("foreign weights", lambda f: torch.save({"w": torch.zeros(2)}, f / "isSmall_0_OrderFeature.pt"),
     "isSmall_0_OrderFeature.pt: does not fit the handler's model"),
    ("pickled code in the weights", lambda f: torch.save({"w": _Exploit(f / "pwned")}, f / "isSmall_0_OrderFeature.pt"),
     "refused under safe loading (weights_only=True): the file needs the unsafe pickled global(s) posix.system"),
    ("two checkpoints", lambda f: [(f / n).write_bytes(b"x") for n in ("a.ckpt", "b.ckpt")],
     "2 checkpoint (.ckpt) files (a.ckpt, b.ckpt)"),
    ("features and handler disagree", lambda f: (f / "features.json").write_text(
        json.dumps({**json.loads((ROOT / "features.json").read_text()), "seq_len": 40})),
     "'handler.model_args.seq_len' is 51, but the feature lists give 40"),
    ("features lists broken", lambda f: (f / "features.json").write_text(
        json.dumps({**json.loads((ROOT / "features.json").read_text()), "input_data_seq_num_vars": ["a"]})),
     "'input_data_seq_num_vars' must be seq_num_vars followed by 'orderDate' and 'objectId' (53 names), got 1"),
]


@pytest.mark.parametrize(("what", "damage", "message"), BAD_FOLDERS, ids=[b[0] for b in BAD_FOLDERS])
def test_bad_model_folders_are_refused_in_one_line(tmp_path, what, damage, message):
    folder = copy_folder(tmp_path)
    damage(folder)
    with pytest.raises(ArtifactError) as err:
        inference.load_endpoint(folder, "eager")
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text
    assert not (folder / "pwned").exists()


def test_missing_folder_and_unknown_backend(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        inference.load_endpoint(tmp_path / "nope", "eager")
    with pytest.raises(ArtifactError, match="unknown backend 'tensorrt'; choose one of onnx, eager"):
        inference.load_endpoint(MODEL_DIR, "tensorrt")


def test_damaged_onnx_file_is_refused(tmp_path):
    folder = copy_folder(tmp_path)
    (folder / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ArtifactError, match="model.onnx: cannot be loaded by ONNX Runtime") as err:
        inference.load_endpoint(folder, "onnx")
    assert "\n" not in str(err.value)


def test_features_come_from_the_folder_then_the_package(tmp_path):
    folder = copy_folder(tmp_path)
    packaged = inference.load_endpoint(folder, "eager")
    assert packaged.folder.features.source == "packaged features.json"
    feats = json.loads((ROOT / "features.json").read_text())
    del feats["handler"]  # params.py as data, without the handler constants: the packaged ones are used
    (folder / "features.json").write_text(json.dumps(feats))
    own = inference.load_endpoint(folder, "eager")
    assert own.folder.features.source == f"feature lists {folder / 'features.json'}"
    assert own.folder.features.model_args == packaged.folder.features.model_args
    req = requests()[0]
    assert own.predict(json.loads(req["body"])) == packaged.predict(json.loads(req["body"]))
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({**feats, "SEP": "|"}))
    explicit = inference.load_endpoint(folder, "eager", features=other)  # an explicit path wins
    assert explicit.plan.sep == "|"


def test_a_port_checkpoint_wins_over_the_legacy_weights(tmp_path):
    from lightning_port import convert

    folder = copy_folder(tmp_path)
    sd, _, _ = convert.split_legacy(convert.load_file(folder / "isSmall_0_OrderFeature.pt"))
    feats = json.loads((ROOT / "features.json").read_text())
    ckpt, _ = convert.legacy_to_lightning(sd, {**feats["handler"]["model_args"], "modelname": "OrderFeature"})
    torch.save(ckpt, folder / "model.ckpt")
    m = inference.load_endpoint(folder, "eager")
    assert m.source.startswith("model.ckpt (port checkpoint; isSmall_0_OrderFeature.pt not used)")
    legacy = endpoint("eager")
    for req in requests()[:30]:

        def outcome(model, body=req["body"]):
            try:
                return repr(model.predict(json.loads(body)))
            except Exception as exc:  # noqa: BLE001 - compared as text
                return repr(exc)

        assert outcome(m) == outcome(legacy), req["id"]  # the same weights: the same scores and refusals


def test_an_onnx_file_in_the_folder_is_served_as_it_is(tmp_path):
    folder = copy_folder(tmp_path, with_weights=False)
    exported = next(p for p in endpoint("onnx").scorer.path.parent.glob("*.onnx"))
    shutil.copy(exported, folder / "model.onnx")
    m = inference.load_endpoint(folder, "onnx")
    assert m.source == "model.onnx (ONNX file in the folder)"
    ref = endpoint("onnx")
    for req, rec in zip(requests(), responses()):
        if rec["ok"] and rec["prediction"] not in ("-1", "nan"):
            data = json.loads(req["body"])
            assert m.predict(data) == ref.predict(data)
    with pytest.raises(ArtifactError, match="no weights"):  # the eager backend needs the .pt or a .ckpt
        inference.load_endpoint(folder, "eager")


def test_logs_carry_no_request_values(caplog):
    m = endpoint("eager")
    secret = "462-7284194-5304900"  # an objectId of the first request's history
    body = json.loads(requests()[0]["body"])
    assert secret in json.dumps(body)
    body.pop("BFS.Signin_Age_NA.Checkout_OS")  # a missing key: the legacy printed the whole request
    with caplog.at_level(logging.DEBUG, logger="lightning_port.serving"):
        assert m.predict(body) == -1
        m.predict(json.loads(requests()[6]["body"]))  # the "not matured" warning
        with pytest.raises(ValueError, match="could not convert string to float"):
            m.predict(json.loads(requests()[53]["body"]))  # a crash: could not convert string to float
    text = caplog.text
    assert "Input data does not contain required key in input_data_seq_cat_vars." in text
    assert "not matured" in text
    assert "ValueError: could not convert string to float: np.str_(<value>)" in text  # the value left out
    assert secret not in text and "visa" not in text and "1725432729" not in text and "abc" not in text
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_a_moe_checkpoint_is_served_deterministic_and_batch_invariant(tmp_path):
    # the handler's own model has no MoE; a port checkpoint with MoE layers would flip the legacy's coins in eval
    # ("random" policy): served with the deterministic export policy and batch-invariant capacity instead
    from lightning_port.module import TemporalSelfAttentionClassification
    from lightning_port.serving.scorers import WeightChoice, load_module

    feats = inference.read_model_folder(MODEL_DIR).features
    args = {**feats.model_args, "use_moe": 1, "n_layers_order": 1, "n_layers_feature": 1}
    torch.manual_seed(0)
    module = TemporalSelfAttentionClassification(**args)
    assert module.config.moe_eval_policy == "random"
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "moe.ckpt")
    served = load_module(WeightChoice("ckpt", tmp_path / "moe.ckpt", ""), feats)
    assert served.config.moe_eval_policy == "expected" and served.config.batch_invariant
    x = endpoint("eager").plan.parse(json.loads(requests()[0]["body"]))
    args_ = (torch.from_numpy(x.x_cat)[None], torch.from_numpy(x.x_num)[None], torch.from_numpy(x.x_engineered)[None],
             torch.from_numpy(x.time_seq)[None], None, torch.from_numpy(x.key_padding_mask)[None])
    module.eval()
    with torch.no_grad():
        state = torch.get_rng_state()
        module.network(*args_)
        assert not torch.equal(state, torch.get_rng_state())  # the legacy policy draws its coins in eval
        state = torch.get_rng_state()
        served_runs = {float(served.network(*args_)[0][0, 1]) for _ in range(4)}
        assert torch.equal(state, torch.get_rng_state())  # the served policy draws nothing
    assert len(served_runs) == 1


def test_packaged_feature_lists_are_the_recorded_ones_and_tsa_serve_is_installed():
    from importlib import import_module

    from lightning_port.serving.artifacts import PACKAGED_FEATURES

    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python >= 3.11) reads pyproject.toml")

    assert PACKAGED_FEATURES.read_bytes() == (ROOT / "features.json").read_bytes()  # params.py as data, unchanged
    project = tomllib.loads((ROOT.parents[2] / "pyproject.toml").read_text())
    target = project["project"]["scripts"]["tsa-serve"]
    module, func = target.split(":")
    assert callable(getattr(import_module(module), func))
    assert "serving/features.json" in project["tool"]["setuptools"]["package-data"]["lightning_port"]


@pytest.mark.parametrize("value", ["1e30", "-1e30", "1e25"])
def test_rows_beyond_ort_exact_domain_are_scored_as_the_legacy(value):
    # found by parity `endpoint.port_onnx_vs_reference_drawn`: a current-order value of 1e30 makes the legacy's
    # LayerNorm variance overflow (NaN score), while ONNX Runtime's fused LayerNormalization stays finite. The ONNX
    # backend scores such rows with the eager network: both sides shown, the legacy's answer from the reproduced
    # handler on the same request
    from parity.endpoint import make_endpoint

    m = endpoint("onnx")
    body = json.loads(requests()[0]["body"])
    body[m.folder.features.dense_num_vars[5]] = float(value)
    feed = {k: np.stack([getattr(m.parse(body), a)]) for k, a in inference.INPUTS_ORDER}
    assert scorers.outside_exact_domain(feed).tolist() == [True]
    ort_alone = scorers.positive_scores(m.scorer.ort.logits(feed))[0]
    assert math.isfinite(ort_alone)  # the unguarded ONNX answer: not the legacy's
    legacy = make_endpoint("reference").replay(json.dumps(body), "application/json", "application/json")
    assert legacy.prediction == "nan"
    before = m.scorer.eager_rows
    assert math.isnan(m.predict(body)) and m.scorer.eager_rows == before + 1
    # inside the domain ORT answers, as before
    plain = json.loads(requests()[0]["body"])
    assert abs(m.predict(plain) - float(responses()[0]["prediction"])) <= TOL.atol
    assert m.scorer.eager_rows == before + 1


def test_exact_domain_marks_only_the_rows_beyond_it():
    rows, L = 4, 3
    feed = {"x_num": np.zeros((rows, L, 2), np.float32), "x_engineered": np.zeros((rows, 5), np.float32),
            "time_seq": np.zeros((rows, L, 1), np.float32)}
    feed["x_num"][1, 0, 1] = scorers.EXACT_DOMAIN  # at the bound: inside
    feed["x_num"][2, 2, 0] = -2 * scorers.EXACT_DOMAIN
    feed["x_engineered"][3, 4] = np.nan
    assert scorers.outside_exact_domain(feed).tolist() == [False, False, True, True]
    feed["time_seq"][0, 1, 0] = np.inf
    assert scorers.outside_exact_domain(feed).tolist() == [True, False, True, True]
