"""Strict mode (off by default): what the legacy handler scores silently wrong (legacy-endpoint.md §8) is refused
or fixed. Each test shows both sides: the default answers as the recorded legacy handler, strict does not.
docs/divergences.md lists them."""

from __future__ import annotations

import json
import math

import pytest
from _serving_helpers import SEP, endpoint, features, requests, responses

from lightning_port.serving.preprocess import StrictRefusal
from parity.tolerances import tolerance_for

F = features()
TOL = tolerance_for("endpoint.legacy_score")


def as_recorded(got, rec) -> bool:
    want = float(rec["prediction"])
    return (math.isnan(got) and math.isnan(want)) or abs(got - want) <= TOL.atol


def recorded(kind: str) -> tuple[dict, dict]:
    req, rec = next((q, r) for q, r in zip(requests(), responses()) if r["kind"] == kind)
    return json.loads(req["body"]), rec


@pytest.fixture(scope="module")
def legacy():
    return endpoint("eager")


@pytest.fixture(scope="module")
def strict():
    return endpoint("eager", strict=True)


def test_misaligned_histories_of_equal_length(legacy, strict):
    data, rec = recorded("same_length_mismatched_lines")
    assert as_recorded(legacy.predict(data), rec)  # legacy: scored row by row, no warning
    with pytest.raises(StrictRefusal, match="strict: the categorical and numerical histories .* are not aligned"):
        strict.predict(data)


def test_histories_of_different_lengths(legacy, strict):
    data, rec = recorded("num_group_shorter")
    assert as_recorded(legacy.predict(data), rec)  # legacy: reduced to shared objectIds, resorted
    with pytest.raises(StrictRefusal, match="strict: the categorical history has .* rows and the numerical one"):
        strict.predict(data)


@pytest.mark.parametrize("kind", ["otf_immature_oldest_missing", "otf_immature_newest_missing"])
def test_immature_histories(legacy, strict, kind):
    data, rec = recorded(kind)
    assert as_recorded(legacy.predict(data), rec)  # legacy: every history cut to the shorter one
    with pytest.raises(StrictRefusal, match="strict: the two no-history keys have"):
        strict.predict(data)


def test_no_history_requests_are_not_refused(legacy, strict):
    data, rec = recorded("no_history_blank_billing")  # the blank "" flag always differs in length from the other
    assert strict.predict(data) == legacy.predict(data)


@pytest.mark.parametrize(("kind", "message"), [
    ("blank_current_orderdate_passes", "strict: the current orderDate is blank"),
    ("nan_orderdate_passes", "strict: the current orderDate is NaN"),
    ("future_history_passes", "history order\\(s\\) are dated after the current order"),
])
def test_bad_current_dates_and_future_history(legacy, strict, kind, message):
    data, rec = recorded(kind)
    assert as_recorded(legacy.predict(data), rec)
    with pytest.raises(StrictRefusal, match=message):
        strict.predict(data)


def test_more_than_50_history_rows_keep_the_newest_50(legacy, strict):
    data, rec = recorded("crash_history_51")
    assert rec["error"] == "index can't contain negative values"
    with pytest.raises(ValueError, match="index can't contain negative values"):
        legacy.predict(data)
    newest = dict(data)
    for k in F["input_data_seq_cat_otf_vars"] + F["input_data_seq_num_otf_vars"]:
        newest[k] = SEP.join(data[k].split(SEP)[-50:])
    assert strict.predict(data) == legacy.predict(newest)


def test_sanity_failures_and_nan_scores_are_refused_not_answered_as_low_risk(legacy, strict):
    data, rec = recorded("missing_key_cat")
    assert legacy.predict(data) == -1
    assert legacy.answer(-1) == rec["answer"]  # percentile "0": reads as the safest customer
    with pytest.raises(StrictRefusal, match="strict: sanity check failed: Input data does not contain required key"):
        strict.predict(data)
    data, rec = recorded("extreme_values")
    assert math.isnan(legacy.predict(data))
    assert rec["answer"]["predictions"][0]["score-percentile"] == "0.0"
    with pytest.raises(StrictRefusal, match="strict: the model's score is NaN"):
        strict.predict(data)


def test_strict_answers_ordinary_requests_as_the_legacy(legacy, strict):
    for req, rec in zip(requests(), responses()):
        if rec["kind"] in ("normal", "history_1", "history_50_max", "unknown_categories"):
            data = json.loads(req["body"])
            assert strict.predict(data) == legacy.predict(data), rec["id"]
