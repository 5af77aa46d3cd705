"""The reproduced legacy SageMaker handler (reference/pytorch_inference_handler.py) against the genuine handler's
recorded answers (parity/fixtures/endpoint/): every request through the four functions, the output_fn cases, the
request mutation, and the restricted unpickler."""

import bisect
import json
import math
import os
import pickle
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parity import endpoint as E
from reference import pytorch_inference_handler as H
from reference import safe_pickle

RECORDS = E.fixture_records()


@pytest.fixture(scope="module")
def ref():
    threads = torch.get_num_threads()
    ep = E.reference_endpoint()
    yield ep
    torch.set_num_threads(threads)  # model_fn sets one thread for the whole process (the legacy's behaviour)


@pytest.fixture(scope="module")
def post():
    return E.PostProcessing.from_model_dir()


@pytest.mark.parametrize(("req", "resp"), RECORDS, ids=[f"{q['id']}-{q['kind']}" for q, _ in RECORDS])
def test_every_recorded_request_answers_as_recorded(ref, post, req, resp):
    got = ref.replay_record(req)
    want = E.Outcome.from_record(resp)
    verdict = E.compare_outcomes(got, want, post)
    assert verdict.passed, verdict.problems
    assert got.log == want.log  # the printed lines, cut before "Source:" as the recorder did
    if not want.ok or want.kind != "score":  # crashes, -1 and NaN: everything identical
        assert got.to_record() == want.to_record()
    elif got.prediction == want.prediction:
        assert got.answer == want.answer


def test_most_scores_agree_to_a_few_float32_ulps(ref):
    """The forward on this CPU vs the recording: every scored answer within 16 ulps of the float32 score (measured
    up to 12 here: ATen/MKL kernels of another ISA round differently; see docs/parity.md, endpoint)."""
    ulps = []
    for req, resp in RECORDS:
        want = E.Outcome.from_record(resp)
        if want.kind != "score":
            continue
        got = ref.replay_record(req)
        ulps.append(abs(got.score - want.score) / float(torch.finfo(torch.float32).eps * 2 ** math.floor(
            math.log2(abs(want.score)))))
    assert len(ulps) == 41
    assert max(ulps) <= 16, max(ulps)


def _parse_prediction(text):
    return int(text) if text.lstrip("-").isdigit() else float(text)


@pytest.mark.parametrize(("req", "resp"), [(q, r) for q, r in RECORDS if r["ok"]],
                         ids=[f"{q['id']}-{q['kind']}" for q, r in RECORDS if r["ok"]])
def test_output_fn_on_the_recorded_prediction_gives_the_recorded_answer(ref, req, resp):
    """output_fn alone, fed the genuine handler's own prediction: the three strings exactly (independent of how
    this machine rounds the forward)."""
    assert H.output_fn(_parse_prediction(resp["prediction"]), req["accept"]) == resp["answer"]


def test_output_fn_cases_exactly(ref):
    cases = E.read_jsonl(E.FIXTURE_DIR / "output_fn_cases.jsonl")
    assert len(cases) == 15
    for case in cases:
        pred = _parse_prediction(case["prediction"])
        assert repr(pred) == case["prediction"]
        assert H.output_fn(pred, "application/json") == case["answer"], case["prediction"]


def test_output_fn_refuses_other_accepts(ref):
    for accept in ("text/csv", "application/json; charset=utf-8", None):
        with pytest.raises(ValueError, match=f"^output format doesn't support {accept}$"):
            H.output_fn(0.5, accept)


def test_input_fn_content_types_and_json():
    assert H.input_fn('{"a": NaN}', "application/json")["a"] != H.input_fn('{"a": NaN}', "application/json")["a"]
    assert H.input_fn(b'[1, 2]', "application/json") == [1, 2]
    for ct in ("text/csv", "application/json; charset=utf-8", None):
        with pytest.raises(ValueError, match=f"^{ct} not supported by script!$"):
            H.input_fn("{}", ct)
    with pytest.raises(json.JSONDecodeError):
        H.input_fn("{not json", "application/json")


def _numcat_request(ref):
    """A recorded request with history whose numerical-categorical values are float strings."""
    F = ref.model.features
    for req, _ in RECORDS:
        if req["kind"] == "numcat_float_strings":
            return F, json.loads(req["body"])
    raise AssertionError("no numcat_float_strings record")


def test_predict_fn_mutates_the_request_as_the_legacy_did(ref):
    F, body = _numcat_request(ref)
    sep = F["SEP"]
    body.pop("objectId", None)
    before = dict(body)
    with H.captured_log():
        H.predict_fn(body, ref.model)
    assert body["objectId"] == "CURRENT"
    changed = {k for k in before if before[k] != body[k]}
    numcat = {F["seq_cat_vars"][i] for i in F["numerical_cat_vars_indices"]}
    numcat_otf = {F["input_data_seq_cat_otf_vars"][i] for i in F["numerical_cat_vars_indices"]}
    assert changed <= numcat | numcat_otf and changed & numcat and changed & numcat_otf
    for var in changed & numcat:  # int(float(x)) as a decimal string
        assert body[var] == str(int(float(before[var])))
    for otf in changed & numcat_otf:  # every history element but "" normalised, nothing truncated
        old, new = before[otf].split(sep), body[otf].split(sep)
        assert new == [x if x == "" else str(int(float(x))) for x in old]


def test_model_fn_sets_one_thread(ref):
    torch.set_num_threads(2)
    H.model_fn(E.MODEL_DIR, features=E.FEATURES)
    assert torch.get_num_threads() == 1


def test_model_fn_without_feature_lists_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="no features.json in it and no features=PATH given") as exc:
        H.model_fn(tmp_path)
    assert "\n" not in str(exc.value)


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["preprocessor.pkl", "percentile_score.pkl"])
def test_a_hostile_pickle_is_refused_in_one_line_and_nothing_runs(tmp_path, name):
    model_dir = tmp_path / "model"
    shutil.copytree(E.MODEL_DIR, model_dir)
    marker = tmp_path / "executed"
    (model_dir / name).write_bytes(pickle.dumps({"seq_num_scale_": _Hostile(marker)}))
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="refused") as exc:
        H.model_fn(model_dir, features=E.FEATURES)
    torch.set_num_threads(threads)
    msg = str(exc.value)
    assert "\n" not in msg and name in msg and "refused" in msg and "posix.system" in msg
    assert not marker.exists()
    # the file is really hostile: plain pickle.loads (what the genuine handler calls) runs the command
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Hostile(control)))
    assert control.exists()


def test_a_damaged_pickle_is_one_line(tmp_path):
    (tmp_path / "p.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle") as exc:
        safe_pickle.load(tmp_path / "p.pkl", "preprocessor")
    assert "\n" not in str(exc.value)


def test_safe_pickle_reads_every_protocol_of_arrays_and_scalars():
    import numpy as np

    obj = {"a": np.arange(6.0).reshape(2, 3), "b": np.float64(0.25), "c": [np.float32(1.5), 2, "x"],
           "d": np.array(["p", "qq"]), "e": np.arange(3, dtype=np.int64)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = safe_pickle.loads(pickle.dumps(obj, protocol=protocol))
        assert back.keys() == obj.keys()
        for k in obj:
            assert np.array_equal(np.asarray(back[k]), np.asarray(obj[k])), (protocol, k)
    with pytest.raises(pickle.UnpicklingError, match="dtype"):
        safe_pickle.loads(pickle.dumps(np.array([object()], dtype=object)))


@st.composite
def _tables(draw):
    scores = sorted(draw(st.lists(st.floats(0.001, 0.999), min_size=1, max_size=40, unique=True)))
    return [[s, i / len(scores)] for i, s in enumerate(scores)]


@given(table=_tables(), data=st.data())
def test_percentile_without_ties_is_the_next_row_rule(table, data):
    """Independent formulation on tables without ties: pct of row min(bisect_right(x), N - 1)."""
    scores = [r[0] for r in table]
    x = data.draw(st.one_of(st.sampled_from(scores), st.floats(0.0005, 0.9995)), label="x")
    want = table[min(bisect.bisect_right(scores, x), len(table) - 1)][1]
    assert H.get_percentile_score(x, table) == want
    assert H.get_percentile_score(0.0, table) == 0 and H.get_percentile_score(1.0, table) == 1
    assert H.get_percentile_score(float("nan"), table) == table[0][1]


def test_percentile_ties_follow_the_search_path():
    """legacy-endpoint.md §6.1: rows 0..50 share one score; mid = 499, 249, 124, 61, 30 -> pct of row 31."""
    table = [[0.25 if i <= 50 else 0.25 + i * 1e-4, i / 1000] for i in range(1000)]
    assert H.get_percentile_score(0.25, table) == 0.031
