"""The port's data_parsing (lightning_port.serving.preprocess) on the quirks of legacy-endpoint.md §2-§3 that the
recorded requests do not each pin down. Every expected value is worked out here from the description and the
fixture's artefacts (maps, defaults, scalers), never by the code under test."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
from _serving_helpers import MODEL_DIR, SEP, base_request, endpoint, features, otf, with_rows

from lightning_port.serving.preprocess import LegacyRequestError, ModelInputs, RequestPlan, SanityFailure

F = features()
CAT_MAP = json.loads((MODEL_DIR / "cat_to_index.json").read_text())
DEFAULTS = json.loads((MODEL_DIR / "default_value_dict.json").read_text())
with open(MODEL_DIR / "preprocessor.pkl", "rb") as _f:
    SCALERS = pickle.load(_f)  # the recorded fixture, shipped with the project: trusted
L = F["seq_len"]
CAT = F["seq_cat_vars"]
NUM = F["seq_num_vars"]
DENSE = F["dense_num_vars"]
NUMCAT = [CAT[i] for i in F["numerical_cat_vars_indices"]]


@pytest.fixture(scope="module")
def plan() -> RequestPlan:
    return endpoint("eager").plan


def parse(plan, data):
    return plan.parse(data)


def legacy_error(plan, data):
    with pytest.raises(LegacyRequestError) as err:
        plan.parse(data)
    return type(err.value.error), str(err.value.error)


def cat_index(col: str, text: str) -> int:
    return CAT_MAP[col].get(text, 0)


# --- §3.1 / §2: type and keys ------------------------------------------------------------------------------
def test_not_a_dict_and_the_first_missing_group(plan):
    assert parse(plan, [1, 2]) == SanityFailure("Input data is not a dict obj.")
    data = base_request()
    del data[DENSE[5]]
    del data[F["input_data_seq_num_otf_vars"][3]]
    assert parse(plan, data) == SanityFailure("Input data does not contain required key in input_data_seq_num_otf_vars.")
    data = base_request()
    assert "objectId" not in data  # never needed: the handler writes "CURRENT" first
    data["objectId"] = "whatever"
    data["extra key"] = [1, 2, 3]  # extra keys are ignored
    assert isinstance(parse(plan, data), ModelInputs)


# --- §3.6: numerical categoricals -------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "text"), [
    ("3.0", "3"), ("2.7", "2"), ("-0.5", "0"), (" 1e0 ", "1"), (2.0, "2"), (True, "1"), (False, "0"),
    ("false", "false"),  # exempt in the current order: kept as it is ("false" is not in Iccc's map -> 0)
])
def test_numcat_current_is_int_of_float(plan, value, text):
    col = "Iccc"
    assert col in NUMCAT
    data = base_request()
    data[col] = value
    x = parse(plan, data)
    assert x.x_cat[-1, CAT.index(col)] == cat_index(col, text)


def test_numcat_current_blank_takes_the_default_unnormalised(plan):
    data = base_request()
    data["Iccc"] = "My Text String"
    x = parse(plan, data)
    assert x.x_cat[-1, CAT.index("Iccc")] == cat_index("Iccc", str(DEFAULTS["Iccc"]))


@pytest.mark.parametrize(("value", "error"), [
    ("abc", (ValueError, "could not convert string to float: 'abc'")),
    ("My text String", (ValueError, "could not convert string to float: 'My text String'")),
    ("true", (ValueError, "could not convert string to float: 'true'")),
    ("nan", (ValueError, "cannot convert float NaN to integer")),
    ("inf", (OverflowError, "cannot convert float infinity to integer")),
    (None, (TypeError, "float() argument must be a string or a real number, not 'NoneType'")),
    ({"a": 1}, (TypeError, "float() argument must be a string or a real number, not 'dict'")),
])
def test_numcat_current_failures(plan, value, error):
    data = base_request()
    data["Iccc"] = value
    assert legacy_error(plan, data) == error


def test_numcat_history_exempts_only_the_empty_string_even_where_truncation_would_drop_it(plan):
    key = otf("Iccc")
    data = base_request()
    seq = data[key].split(SEP)
    seq[3] = ""  # fine: "" is exempt (then default-filled)
    data[key] = SEP.join(seq)
    assert isinstance(parse(plan, data), ModelInputs)
    seq[0] = "false"  # the oldest element ...
    data[key] = SEP.join(seq)
    flag = F["handler"]["no_history_keys"][0]
    data[flag] = SEP.join(data[flag].split(SEP)[1:])  # ... which the "not matured" truncation would drop
    assert legacy_error(plan, data) == (ValueError, "could not convert string to float: 'false'")


# --- §3.2 / §3.3: no history, truncation ----------------------------------------------------------------------------
def test_no_history_ignores_every_history_string(plan):
    data = base_request()
    f1, f2 = F["handler"]["no_history_keys"]
    data[f2] = "My Text String"  # blank: no history
    for k in F["input_data_seq_num_otf_vars"]:
        data[k] = "garbage;SEP;x"  # never parsed
    data[otf("Iccc")] = "not a number"
    x = parse(plan, data)
    assert x.history_rows == 0
    assert x.key_padding_mask[: L].sum() == L - 1 and not x.key_padding_mask[L - 1:].any()
    data[f1] = 5  # a flag key is split even without history
    assert legacy_error(plan, data) == (AttributeError, "'int' object has no attribute 'split'")


def test_not_matured_truncates_every_history_to_the_newest_elements(plan):
    data = with_rows(base_request(), 6)
    f1 = F["handler"]["no_history_keys"][0]
    data[f1] = SEP.join(data[f1].split(SEP)[2:])  # 4 elements vs 6: keep the newest 4 of every sequence
    x = parse(plan, data)
    assert x.history_rows == 4
    assert x.warnings == ("Input data OTF not matured. Lengths of two batches not matched.",)
    dates = [float(v) for v in data[otf("orderDate", "num")].split(SEP)[-4:]]
    cur = float(data["orderDate"])
    np.testing.assert_array_equal(x.time_seq[L - 5: L - 1, 0], np.float32([cur - d for d in dates]))


def test_unequal_counts_inside_a_group_is_numpys_ragged_array(plan):
    data = base_request()
    k = otf(CAT[7])
    data[k] = SEP.join(data[k].split(SEP)[1:])
    assert legacy_error(plan, data) == (ValueError, "setting an array element with a sequence. The requested array "
                                        "has an inhomogeneous shape after 1 dimensions. The detected shape was (110,) "
                                        "+ inhomogeneous part.")
    data = base_request()
    k = otf(NUM[7])
    data[k] = data[k] + SEP + "1"
    assert legacy_error(plan, data)[1].endswith("The detected shape was (53,) + inhomogeneous part.")


# --- §3.5: default filling and types ---------------------------------------------------------------------------------
def test_blank_without_default_is_a_key_error_and_null_default_is_nan(plan):
    missing = next(v for v in DENSE if v not in DEFAULTS)
    data = base_request()
    data[missing] = "My Text String"
    assert legacy_error(plan, data) == (KeyError, repr(missing))
    null = next(v for v in DENSE if v in DEFAULTS and DEFAULTS[v] is None)
    data = base_request()
    data[null] = ""
    x = parse(plan, data)
    assert math.isnan(x.x_engineered[DENSE.index(null)])


def test_a_list_anywhere_in_a_current_row(plan):
    for name, n in ((CAT[2], 110), (NUM[2], 53), (DENSE[2], 415)):
        data = base_request()
        data[name] = [1, 2]
        assert legacy_error(plan, data)[1].endswith(f"The detected shape was ({n},) + inhomogeneous part."), name


def test_numbers_parse_with_pythons_float_and_numpys_messages(plan):
    j = 4
    data = base_request()
    data[NUM[j]] = " 1.5e0 "
    x = parse(plan, data)
    assert x.x_num[-1, j] == np.float32(1.5 * SCALERS["seq_num_scale_"][j] + SCALERS["seq_num_min_"][j])
    for bad in ("abc", " ", "True"):
        data[NUM[j]] = bad
        assert legacy_error(plan, data) == (ValueError, f"could not convert string to float: np.str_({bad!r})")
    data[NUM[j]] = True  # a JSON boolean in a string array: "True"
    assert legacy_error(plan, data) == (ValueError, "could not convert string to float: np.str_('True')")
    data[NUM[j]] = {"a": 1}  # an object makes the row an object array
    assert legacy_error(plan, data) == (TypeError, "float() argument must be a string or a real number, not 'dict'")


def test_a_null_makes_the_numeric_row_an_object_array(plan):
    data = base_request()
    data[NUM[1]] = None  # -> NaN
    data[NUM[2]] = True  # in an object array: float(True) = 1.0
    x = parse(plan, data)
    assert math.isnan(x.x_num[-1, 1])
    assert x.x_num[-1, 2] == np.float32(1.0 * SCALERS["seq_num_scale_"][2] + SCALERS["seq_num_min_"][2])
    data[NUM[3]] = "abc"  # ... and text fails with Python's message, not numpy's
    assert legacy_error(plan, data) == (ValueError, "could not convert string to float: 'abc'")


def test_categorical_cells_are_text(plan):
    col = CAT[0]  # a non-numerical categorical with a map
    assert col not in NUMCAT
    data = base_request()
    for value, text in ((None, "None"), ({"a": 1}, "{'a': 1}"), (2.0, "2.0"), (True, "True"), ("visa", "visa")):
        data[col] = value
        assert parse(plan, data).x_cat[-1, 0] == cat_index(col, text), value


def test_unmapped_columns_pass_raw_integers(plan):
    folder = endpoint("eager").folder
    maps = list(folder.cat_maps)
    maps[0] = None  # column 0 without a map
    p = RequestPlan(dataclasses.replace(folder, cat_maps=tuple(maps)))
    data = with_rows(base_request(), 2)
    data[otf(CAT[0])] = "5;SEP;None"
    data[CAT[0]] = " 7 "
    x = parse(p, data)
    np.testing.assert_array_equal(x.x_cat[-3:, 0], [5, 0, 7])
    for bad in ("A", "5.0"):
        data[CAT[0]] = bad
        assert legacy_error(p, data) == (ValueError, f"invalid literal for int() with base 10: np.str_({bad!r})")
    data[CAT[0]] = "2405"  # one past the table (2403 + 2 rows): the legacy model's IndexError, after data_parsing
    assert legacy_error(p, data) == (IndexError, "index out of range in self")
    data[otf("orderDate", "num")] = SEP.join(["1", "2"])  # ... unless the date check fails first: -1
    assert parse(p, data) == SanityFailure("Sequence OTF recorded wrong orderDate.")


# --- §3.7: alignment -------------------------------------------------------------------------------------------------------
def _aligned(data, cat_ids, num_ids, num_dates, col0):
    cat_n, num_n = len(cat_ids), len(num_ids)
    with_rows(data, cat_n, "cat")
    with_rows(data, num_n, "num")
    data[otf("objectId", "cat")] = SEP.join(cat_ids)
    data[otf("objectId", "num")] = SEP.join(num_ids)
    data[otf("orderDate", "num")] = SEP.join(map(str, num_dates))
    data[otf(CAT[0])] = SEP.join(col0)
    return data


def test_different_row_counts_keep_shared_objectids_sorted_as_text_first_occurrence(plan):
    cur = 1725432729
    data = base_request()
    data["orderDate"] = str(cur)
    # cat rows: ids b, a, a, c with column-0 values HIGH, visa, 0, -1; num rows: ids c, a, b with dates
    data = _aligned(data, ["b", "a", "a", "c"], ["c", "a", "b"], [cur - 729, cur - 1729, cur - 2729],
                    ["HIGH", "visa", "0", "-1"])
    x = parse(plan, data)
    assert x.warnings == ("Input data OTFs have mismatch length. Use only currently order for evaluation.",)
    # shared ids sorted: a, b, c; cat first occurrences a -> row 1 (visa), b -> 0 (HIGH), c -> 3 (-1)
    np.testing.assert_array_equal(x.x_cat[L - 4: L - 1, 0], [cat_index(CAT[0], v) for v in ("visa", "HIGH", "-1")])
    # num: a -> row 1 (1729 before), b -> row 2 (2729), c -> row 0 (729)
    np.testing.assert_array_equal(x.time_seq[L - 4:, 0], [1729, 2729, 729, 0])
    assert x.key_padding_mask[: L - 4].all() and not x.key_padding_mask[L - 4:].any()
    data = _aligned(base_request(), ["x", "y"], ["p"], [cur - 5], ["HIGH", "visa"])  # nothing shared
    x = parse(plan, data)
    assert x.history_rows == 0


def test_equal_row_counts_are_used_row_by_row_even_when_misaligned(plan):
    cur = 1725432729
    data = base_request()
    data["orderDate"] = str(cur)
    data = _aligned(data, ["x", "y"], ["p", "q"], [cur - 10, cur - 20], ["HIGH", "visa"])
    x = parse(plan, data)
    assert x.warnings == ()
    np.testing.assert_array_equal(x.x_cat[L - 3: L - 1, 0], [cat_index(CAT[0], "HIGH"), cat_index(CAT[0], "visa")])
    np.testing.assert_array_equal(x.time_seq[L - 3:, 0], [10, 20, 0])


# --- §3.8 / §3.9 / §3.10: matrices ------------------------------------------------------------------------------------
def test_more_than_50_history_rows_crash(plan):
    data = with_rows(base_request(), 1)
    for k in F["input_data_seq_cat_otf_vars"] + F["input_data_seq_num_otf_vars"]:
        data[k] = SEP.join([data[k]] * 51)
    assert legacy_error(plan, data) == (ValueError, "index can't contain negative values")
    for k in F["input_data_seq_cat_otf_vars"] + F["input_data_seq_num_otf_vars"]:
        data[k] = SEP.join(data[k].split(SEP)[:50])
    assert parse(plan, data).history_rows == 50


def test_time_to_the_current_order_in_float64_and_the_date_check(plan):
    cur = 1725432729
    data = with_rows(base_request(), 2)
    data["orderDate"] = str(cur)
    data[otf("orderDate", "num")] = f"{cur - 10_000_000}{SEP}{cur - 1}"  # exactly 1e7 passes; 1 s survives float64
    x = parse(plan, data)
    np.testing.assert_array_equal(x.time_seq[L - 3:, 0], [1e7, 1, 0])
    assert np.float32(cur) - np.float32(cur - 1) != 1  # (float32 spacing near 1.7e9 is 128)
    data[otf("orderDate", "num")] = f"{cur - 10_000_001}{SEP}{cur - 1}"
    assert parse(plan, data) == SanityFailure("Sequence OTF recorded wrong orderDate.")
    data[otf("orderDate", "num")] = f"nan{SEP}{cur - 20_000_000}"  # a NaN makes the max NaN: passes
    assert isinstance(parse(plan, data), ModelInputs)
    data[otf("orderDate", "num")] = f"{cur + 99}{SEP}{cur - 1}"  # future-dated history passes
    assert parse(plan, data).time_seq[L - 3, 0] == -99
    data[otf("orderDate", "num")] = f"My Text String{SEP}{cur - 1}"  # blank history date: default -1 -> fails
    assert parse(plan, data) == SanityFailure("Sequence OTF recorded wrong orderDate.")


def test_scaling_padding_and_the_mask(plan):
    data = with_rows(base_request(), 3)
    x = parse(plan, data)
    assert x.x_cat.shape == (L, len(CAT)) and x.x_num.shape == (L, len(NUM)) and x.time_seq.shape == (L, 1)
    assert x.key_padding_mask.shape == (L + 1,) and x.x_engineered.shape == (len(DENSE),)
    assert not x.x_cat[: L - 4].any() and not x.x_num[: L - 4].any() and not x.time_seq[: L - 4].any()
    assert x.key_padding_mask[: L - 4].all() and not x.key_padding_mask[L - 4:].any()
    j = 9
    hist = float(data[otf(NUM[j])].split(SEP)[0])
    assert x.x_num[L - 4, j] == np.float32(hist * SCALERS["seq_num_scale_"][j] + SCALERS["seq_num_min_"][j])
    for k in (0, 265, 266, 412):  # the static scalers without entries 266 and 267
        e = k if k < 266 else k + 2
        want = float(data[DENSE[k]]) * SCALERS["num_static_scale_"][e] + SCALERS["num_static_min_"][e]
        assert x.x_engineered[k] == np.float32(want), k


def test_dense_parsing_comes_after_the_date_check(plan):
    data = base_request()
    data[DENSE[3]] = "abc"
    assert legacy_error(plan, data) == (ValueError, "could not convert string to float: np.str_('abc')")
    data[otf("orderDate", "num")] = SEP.join(["1"] * len(data[otf("orderDate", "num")].split(SEP)))
    assert parse(plan, data) == SanityFailure("Sequence OTF recorded wrong orderDate.")


def test_parse_leaves_the_request_unchanged(plan):
    data = base_request()
    data["Iccc"] = "3.0"
    before = json.dumps(data, sort_keys=True)
    parse(plan, data)
    assert json.dumps(data, sort_keys=True) == before  # (the legacy mutated it: objectId, numcat, histories)
