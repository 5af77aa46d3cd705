"""The legacy endpoint's post-processing (``lightning_port.serve``): ``percentile_score`` and
``probability_score``, the restricted reader of ``percentile_score.pkl``, and ``tsa-score
--percentiles/--calibration``.

Expected values at the edges are worked out by hand in each test (never by the function under test);
the spline is also checked against scipy's FITPACK ``splev`` and a Cox-de Boor recursion written here.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch

from lightning_port import serve

ROWS = serve.PERCENTILE_ROWS


def linear_table() -> list:
    """Row k = [(1000 + 8k) / 10000, k / 1000]: scores 0.1, 0.1008, ..., 0.8992 (exact decimal steps),
    as the legacy pickles them (numpy float64 score, Python float percentile)."""
    return [[np.float64((1000 + 8 * k) / 10000), k / 1000] for k in range(ROWS)]


def logistic(s: float) -> float:
    return 1.0 / (1.0 + math.exp(-s))


# --- percentile_score ------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "expected", "rule"), [
    (0.0, 0.0, "0 at 0"),
    (-0.3, 0.0, "0 below 0"),
    (1.0, 1.0, "1 at 1"),
    (1.7, 1.0, "1 above 1"),
    (0.05, 0.0, "above 0, below the first row (0.1): row 0's percentile"),
    (0.1, 0.0, "exactly the first row"),
    (0.5, 0.5, "exactly row 500 (0.1 + 0.0008 * 500 = 0.5): that row"),
    (0.5002, 0.501, "between rows 500 (0.5) and 501 (0.5008): the next row"),
    (0.5008, 0.501, "exactly row 501"),
    (0.8992, 0.999, "exactly the last row"),
    (0.95, 1.0, "above the last row (0.8992), below 1: the row after the last is the 100th percentile"),
])
def test_percentile_edges_hand_checked(raw, expected, rule):
    assert serve.percentile_score(raw, linear_table()) == expected, rule


def test_percentile_ties_take_the_first_tied_row():
    # rows 0..99: 0.1 .. 0.1792 (linear_table); rows 100..199 all 0.3 (many equal calibration scores);
    # rows 200..999: 0.31, 0.3108, ... (0.31 + 0.0008 (k - 200))
    rows = linear_table()
    for k in range(100, ROWS):
        rows[k][0] = np.float64(0.3 if k < 200 else 0.31 + (k - 200) * 0.0008)
    assert serve.percentile_score(0.3, rows) == 0.1  # equal to rows 100..199: the first of them
    assert serve.percentile_score(0.25, rows) == 0.1  # between row 99 (0.1792) and the tie: the next row
    assert serve.percentile_score(0.30001, rows) == 0.2  # above the tie, below row 200 (0.31): row 200
    assert serve.percentile_score(0.31, rows) == 0.2  # exactly row 200


def test_percentile_vectorised_scalar_in_scalar_out_and_nan():
    table = linear_table()
    raw = np.array([[0.0, 0.05, 0.5], [0.5002, 0.95, np.nan]])
    out = serve.percentile_score(raw, table)
    assert out.shape == (2, 3)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out[0], [0.0, 0.0, 0.5])
    np.testing.assert_array_equal(out[1, :2], [0.501, 1.0])
    assert np.isnan(out[1, 2])
    assert isinstance(serve.percentile_score(0.5, table), float)
    assert isinstance(serve.percentile_score(np.float32(0.5), table), float)
    assert math.isnan(serve.percentile_score(float("nan"), table))
    # float32 raw scores (what score files hold) compare exactly: np.float32(0.5) == 0.5
    assert serve.percentile_score(np.float32(0.5), table) == 0.5
    # the same table as a list, an array, and a PercentileTable
    arr = np.array(table, dtype=np.float64)
    tab = serve.PercentileTable.from_rows(table)
    for t in (arr, tab):
        np.testing.assert_array_equal(serve.percentile_score(raw[0], t), out[0])


@pytest.mark.parametrize(("rows", "message"), [
    ([[0.1, 0.0]] * 999, "expected 1000 rows"),
    ([[0.1, 0.0, 1.0]] * ROWS, "row 0 is"),
    ("not a table", "expected a list of [score, percentile] rows"),
    ({"a": 1}, "expected a list of [score, percentile] rows"),
    (np.zeros((ROWS, 3)), "shape (1000, 3)"),
])
def test_percentile_table_structure_errors(rows, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        serve.percentile_score(0.5, rows)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_percentile_table_order_and_finiteness_errors():
    rows = linear_table()
    rows[10][0] = np.float64(0.0)
    with pytest.raises(ValueError, match=r"scores must be non-decreasing, but row 10"):
        serve.PercentileTable.from_rows(rows)
    rows = linear_table()
    rows[7][1] = rows[6][1]
    with pytest.raises(ValueError, match=r"percentiles must be strictly increasing, but row 7"):
        serve.PercentileTable.from_rows(rows)
    rows = linear_table()
    rows[3][0] = float("nan")
    with pytest.raises(ValueError, match=r"row 3 is not finite"):
        serve.PercentileTable.from_rows(rows)
    rows = [[r[0], r[1] + 0.5] for r in linear_table()]
    with pytest.raises(ValueError, match=r"percentiles must lie in \[0, 1\]"):
        serve.PercentileTable.from_rows(rows)


# --- percentile_score.pkl ----------------------------------------------------------------------------
def test_load_percentile_table_from_legacy_pickles(tmp_path):
    from lightning_port.scoring import write_percentile_table

    table = linear_table()
    for protocol in (2, 4, pickle.DEFAULT_PROTOCOL):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(table, protocol=protocol))
        loaded = serve.load_percentile_table(path)
        np.testing.assert_array_equal(loaded.scores, [r[0] for r in table])
        np.testing.assert_array_equal(loaded.percentiles, [r[1] for r in table])
    # numpy 1.x wrote its scalars under numpy.core.multiarray (protocol 2 names globals as text)
    old = pickle.dumps(table, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\nscalar" in old
    (tmp_path / "np1.pkl").write_bytes(old)
    np.testing.assert_array_equal(serve.load_percentile_table(tmp_path / "np1.pkl").scores, [r[0] for r in table])
    # the port's own writer (float32 scores from np.percentile on float32 calibration scores)
    cali = np.random.default_rng(0).random(500).astype(np.float32)
    write_percentile_table(tmp_path / "port.pkl", cali)
    port = serve.load_percentile_table(tmp_path / "port.pkl")
    assert port.scores[0] == cali.min()
    assert port.scores[-1] == np.float32(np.percentile(cali, 99.9))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "object scalar", "builtins.eval"])
def test_load_percentile_table_never_runs_code(payload, tmp_path):
    marker = tmp_path / "pwned"
    if payload == "os.system":
        data = pickle.dumps([_Exploit(marker)] + linear_table()[1:])
    elif payload == "object scalar":  # numpy.dtype('O8') then scalar(dtype, obj): objects, refused at the dtype
        data = (b"\x80\x02cnumpy._core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
                b"N\x86R.")
    else:  # protocol-2 text: eval("__import__('os').system(...)")
        code = f"__import__('os').system('touch {marker}')".encode()
        data = b"\x80\x02cbuiltins\neval\nX" + len(code).to_bytes(4, "little") + code + b"\x85R."
    path = tmp_path / "percentile_score.pkl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="not loaded") as err:
        serve.load_percentile_table(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_load_percentile_table_damaged_and_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        serve.load_percentile_table(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(ValueError, match="junk.pkl") as err:
        serve.load_percentile_table(tmp_path / "junk.pkl")
    assert "\n" not in str(err.value)
    (tmp_path / "short.pkl").write_bytes(pickle.dumps(linear_table()[:10]))
    with pytest.raises(ValueError, match="expected 1000 rows"):
        serve.load_percentile_table(tmp_path / "short.pkl")


# --- probability_score ---------------------------------------------------------------------------------
def cox_de_boor(t, c, k, x):
    """s(x) by the Cox-de Boor basis recursion (a different algorithm from the de Boor triangle used in
    lightning_port.serve); x inside [t_k, t_n), right-continuous at knots."""
    t = np.asarray(t, dtype=float)

    def basis(i, p):
        if p == 0:
            return 1.0 if t[i] <= x < t[i + 1] else 0.0
        out = 0.0
        if t[i + p] > t[i]:
            out += (x - t[i]) / (t[i + p] - t[i]) * basis(i, p - 1)
        if t[i + p + 1] > t[i + 1]:
            out += (t[i + p + 1] - x) / (t[i + p + 1] - t[i + 1]) * basis(i + 1, p - 1)
        return out

    n = len(t) - k - 1
    return sum(c[i] * basis(i, k) for i in range(n))


def test_probability_linear_spline_hand_checked():
    # degree 1, knots [0, 0, 1, 1], coefficients [-2, 2]: s(x) = -2 (1 - x) + 2 x = 4x - 2
    cal = {"knots": [0, 0, 1, 1], "coefficients": [-2.0, 2.0], "degree": 1}
    assert serve.probability_score(0.25, cal) == pytest.approx(1 / (1 + math.e), abs=1e-15)  # s = -1
    assert serve.probability_score(0.5, cal) == pytest.approx(0.5, abs=1e-15)  # s = 0
    assert serve.probability_score(0.75, cal) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-15)  # s = 1
    # the edge rules win over the spline: s(0) = -2 and s(1) = 2, but the endpoint answers 0 and 1
    assert serve.probability_score(0.0, cal) == 0.0
    assert serve.probability_score(-0.1, cal) == 0.0
    assert serve.probability_score(1.0, cal) == 1.0
    assert serve.probability_score(3.0, cal) == 1.0
    assert math.isnan(serve.probability_score(float("nan"), cal))


def test_probability_one_above_25_is_on_the_logit():
    # degree 0, one piece: s(x) = c everywhere
    def p(c):
        return serve.probability_score(0.5, {"knots": [0.0, 1.0], "coefficients": [c], "degree": 0})

    # at 25: the logistic, not 1 (tolerance: 1 - exp(-25) and 1 / (1 + exp(-25)) round apart by an ulp of 1.0)
    assert p(25.0) == pytest.approx(1 - math.exp(-25), abs=2.3e-16)
    assert p(25.0) < 1.0
    assert p(25.000001) == 1.0  # above 25: exactly 1
    assert p(26.0) == 1.0
    assert logistic(26.0) < 1.0  # ... where the logistic alone would not be 1 in float64
    assert p(-800.0) == 0.0  # no overflow warning (math.exp(800) overflows)
    assert p(-30.0) == pytest.approx(math.exp(-30) / (1 + math.exp(-30)), rel=1e-12)


def test_probability_extrapolates_outside_the_knots():
    # degree 1, knots [0.2, 0.2, 0.8, 0.8], coefficients [-1, 2]: s(x) = -1 + 3 (x - 0.2) / 0.6 = 5x - 2
    cal = {"knots": [0.2, 0.2, 0.8, 0.8], "coefficients": [-1.0, 2.0], "degree": 1}
    assert serve.probability_score(0.1, cal) == pytest.approx(logistic(-1.5), abs=1e-15)  # left of the knots
    assert serve.probability_score(0.9, cal) == pytest.approx(logistic(2.5), abs=1e-15)  # right of them
    assert serve.probability_score(0.8, cal) == pytest.approx(logistic(2.0), abs=1e-15)  # the last knot


def test_probability_duplicate_knots_right_continuous():
    # degree 2 with the interior knot 0.5 repeated 3 (= degree + 1) times: two independent quadratic
    # pieces in Bernstein form, c0..c2 on [0, 0.5), c3..c5 on [0.5, 1]; a jump at 0.5
    c = [0.0, 1.0, -1.0, 3.0, 2.0, 4.0]
    cal = {"knots": [0, 0, 0, 0.5, 0.5, 0.5, 1, 1, 1], "coefficients": c, "degree": 2}
    spline = serve.BSplineCalibration.from_dict(cal)
    # x = 0.25: u = 0.5 on the left piece -> 0.25 c0 + 0.5 c1 + 0.25 c2 = 0.25
    assert spline(0.25) == pytest.approx(0.25, abs=1e-15)
    # x = 0.5: the right piece at its start -> c3 (right-continuous); just below: the left piece's end c2
    assert spline(0.5) == pytest.approx(3.0, abs=1e-15)
    assert spline(0.5 - 1e-12) == pytest.approx(-1.0, abs=1e-9)
    # x = 0.75: u = 0.5 on the right piece -> 0.25 c3 + 0.5 c4 + 0.25 c5 = 2.75
    assert spline(0.75) == pytest.approx(2.75, abs=1e-15)
    assert serve.probability_score(0.75, cal) == pytest.approx(logistic(2.75), abs=1e-15)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_spline_matches_scipy_and_cox_de_boor(k):
    from scipy.interpolate import BSpline, splev, splrep

    rng = np.random.default_rng(k)
    if k in (1, 3):  # a calibration fitted as the legacy job would have (FITPACK: c padded with zeros)
        x = np.sort(rng.uniform(0.05, 0.95, 200))
        y = np.log(x / (1 - x)) * 1.5 - 0.3 + rng.normal(0, 0.2, x.size)
        t, c, k = splrep(x, y, k=k, s=x.size * 0.04)
        assert len(c) == len(t)
    else:  # clamped, with a repeated interior knot (degree 0: a step function, knots at most simple)
        inner = np.sort(np.r_[rng.uniform(0.1, 0.9, 5), [0.5] * min(2, k + 1)])
        t = np.r_[[0.05] * (k + 1), inner, [0.95] * (k + 1)] if k else np.r_[0.05, inner, 0.95]
        c = rng.normal(0, 3, len(t) - k - 1)
    cal = {"knots": list(map(float, t)), "coefficients": list(map(float, c)), "degree": int(k)}
    spline = serve.BSplineCalibration.from_dict(cal)
    q = np.linspace(-0.3, 1.3, 1601)  # includes extrapolation on both sides
    np.testing.assert_allclose(spline(q), splev(q, (t, c, k)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(spline(q), BSpline(t, np.asarray(c)[: len(t) - k - 1], k)(q), rtol=1e-10, atol=1e-10)
    n = len(t) - k - 1
    inside = q[(q >= t[k]) & (q < t[n])][::40]
    want = [cox_de_boor(t, c, k, x) for x in inside]
    np.testing.assert_allclose(spline(inside), want, rtol=1e-10, atol=1e-10)
    raw = np.linspace(0.001, 0.999, 77)
    s = splev(raw, (t, c, k))
    want_p = np.where(s > 25, 1.0, 1 / (1 + np.exp(-s)))
    np.testing.assert_allclose(serve.probability_score(raw, cal), want_p, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("params", "message"), [
    ({"knots": [0, 0, 1, 1], "coefficients": [0, 1]}, "missing key 'degree'"),
    ({"knots": [0, 0, 1, 1], "degree": 1}, "missing key 'coefficients'"),
    ({"coefficients": [0, 1], "degree": 1}, "missing key 'knots'"),
    ({"knots": [0, 0, 1, 1], "coefficients": [0, 1], "degree": 1.5}, "'degree' must be an integer >= 0"),
    ({"knots": [0, 0, 1, 1], "coefficients": [0, 1], "degree": -1}, "'degree' must be an integer >= 0"),
    ({"knots": [0, 1, 0.5, 1], "coefficients": [0, 1], "degree": 1}, "'knots' must be non-decreasing"),
    ({"knots": [0, 0, 0, 1, 1], "coefficients": [0, 1, 2], "degree": 1}, "knot 0.0 is repeated 3 times"),
    ({"knots": [0, 0, 1, 1], "coefficients": [0], "degree": 1}, "'coefficients' must have"),
    ({"knots": [0, 0, 1, 1], "coefficients": [0, 1, 2, 3, 4], "degree": 1}, "'coefficients' must have"),
    ({"knots": [0, 1], "coefficients": [0], "degree": 1}, "at least 2·(degree + 1) = 4"),
    ({"knots": [0, 0, "a", 1], "coefficients": [0, 1], "degree": 1}, "'knots' must be a list of numbers"),
    ({"knots": [0, 0, 1, 1], "coefficients": [0, float("inf")], "degree": 1}, "non-finite value at index 1"),
    ([1, 2, 3], "expected a JSON object"),
])
def test_calibration_errors_are_one_line(params, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        serve.probability_score(0.5, params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_load_calibration(tmp_path):
    path = tmp_path / "bspline_parameters.json"
    path.write_text(json.dumps({"knots": [0, 0, 1, 1], "coefficients": [-2, 2], "degree": 1, "note": "extra keys ok"}))
    cal = serve.load_calibration(path)
    assert serve.probability_score(0.25, cal) == pytest.approx(1 / (1 + math.e), abs=1e-15)
    (tmp_path / "bad.json").write_text("{knots: [")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        serve.load_calibration(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="does not exist"):
        serve.load_calibration(tmp_path / "none.json")


# --- tsa-score -----------------------------------------------------------------------------------
@pytest.fixture
def scored_setup(tmp_path):
    from lightning_port import export as ex
    from lightning_port.module import TemporalSelfAttentionClassification
    from lightning_port.synth import SynthConfig, write_dataset

    cfg = SynthConfig(kind="single", rows=8, eval_rows=30, seed=5)
    write_dataset(tmp_path / "data", cfg)
    torch.manual_seed(0)
    m = TemporalSelfAttentionClassification(
        n_cat_features=cfg.n_cat, n_num_features=cfg.n_num, n_embedding=cfg.n_embedding, seq_len=cfg.seq_len,
        n_engineered_num_features=cfg.n_eng, dim_embedding_table=8, dim_attn_feedforward=16, num_heads=2,
        n_layers_order=1, n_layers_feature=1, use_moe=False).eval()
    onnx_path, _ = ex.export_onnx(m, tmp_path / "m.onnx", exporter="torchscript")
    return tmp_path, onnx_path


def test_score_cli_writes_endpoint_columns_and_keeps_legacy_files(scored_setup, capsys):
    tmp_path, onnx_path = scored_setup
    data = str(tmp_path / "data")
    assert serve.main([str(onnx_path), "--data-dir", data, "--split", "cali", "--out", str(tmp_path / "c")]) == 0
    cal = {"knots": [0, 0, 0, 0, 0.5, 1, 1, 1, 1], "coefficients": [-4.0, -2.0, 0.0, 1.0, 3.0], "degree": 3}
    (tmp_path / "bspline.json").write_text(json.dumps(cal))
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    assert serve.main([str(onnx_path), "--data-dir", data, "--split", "vali", "--out", str(plain)]) == 0
    assert serve.main([str(onnx_path), "--data-dir", data, "--split", "vali", "--out", str(extra),
                       "--percentiles", str(tmp_path / "c" / "percentile_score.pkl"),
                       "--calibration", str(tmp_path / "bspline.json")]) == 0
    out = capsys.readouterr().out
    assert "endpoint_scores.csv" in out
    for name in ("score_file.csv", "tag_file.csv"):  # legacy files unchanged
        assert (extra / name).read_bytes() == (plain / name).read_bytes()
    lines = (extra / "endpoint_scores.csv").read_text().splitlines()
    assert lines[0] == "legacy-score,score-percentile,ProbabilityScore"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == (plain / "score_file.csv").read_text().splitlines()
    with open(tmp_path / "c" / "percentile_score.pkl", "rb") as f:
        table = pickle.load(f)  # our own file, written by this test: plain pickle is fine here
    cali_scores = [r[0] for r in table]
    for raw, pct, prob in rows:
        x = float(np.float32(raw))
        # by hand: the first row whose score >= x (bisect by a linear scan), 1 above the last row
        first = next((k for k, s in enumerate(cali_scores) if s >= x), None)
        assert float(pct) == (1.0 if first is None else table[first][1])
        from scipy.interpolate import splev

        s = float(splev(x, (cal["knots"], cal["coefficients"], cal["degree"])))
        assert float(prob) == pytest.approx(1 / (1 + math.exp(-s)), rel=1e-12)


def test_score_cli_bad_table_is_one_line(scored_setup, capsys):
    tmp_path, onnx_path = scored_setup
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps([[0.1, 0.0]] * 3))
    rc = serve.main([str(onnx_path), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                     "--percentiles", str(bad)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.pkl" in err
    assert "expected 1000 rows" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o" / "score_file.csv").exists()  # refused before scoring
