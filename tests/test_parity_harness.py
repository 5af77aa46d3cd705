"""The parity harness itself: comparisons name the right path and index, NaN is handled, a planted
mismatch fails its check in the report, and the tolerance policy carries reasons."""

import json
import math

import pytest
import torch

from parity import profiles  # noqa: F401
from parity.compare import compare
from parity.report import CheckRecord, not_covered, write_reports
from parity.rng import seeded
from parity.tolerances import OVERRIDES, Tolerance, tolerance_for

TOL = tolerance_for("forward.eval_outputs")


def test_planted_mismatch_is_reported_with_path_and_index():
    expected = {"scores": torch.zeros(4, 3), "grad": {"order.layers.1.ff.w1": torch.ones(2, 5, 6)}}
    actual = {"scores": torch.zeros(4, 3), "grad": {"order.layers.1.ff.w1": torch.ones(2, 5, 6)}}
    actual["grad"]["order.layers.1.ff.w1"][1, 3, 4] += 0.5
    actual["grad"]["order.layers.1.ff.w1"][0, 0, 0] += 1e-4
    comp = compare(actual, expected, TOL, context={"seed": 3})
    assert not comp.passed
    assert comp.paths() == ["grad[order.layers.1.ff.w1]"]
    m = comp.mismatches[0]
    assert m.abs_index == (1, 3, 4)
    assert m.bad == 2
    assert m.numel == 60
    assert m.max_abs_err == pytest.approx(0.5)
    text = comp.report()
    assert "grad[order.layers.1.ff.w1]" in text
    assert "[1, 3, 4]" in text
    assert "seed=3" in text


def test_every_mismatch_is_collected_not_just_the_first():
    comp = compare({"a": torch.ones(3), "b": (torch.ones(2), torch.zeros(2))},
                   {"a": torch.zeros(3), "b": (torch.ones(2), torch.ones(2))}, TOL)
    assert sorted(comp.paths()) == ["a", "b.1"]


def test_nan_handling():
    nan = float("nan")
    assert compare(torch.tensor([1.0, nan]), torch.tensor([1.0, nan]), TOL).passed
    comp = compare(torch.tensor([1.0, nan, 2.0]), torch.tensor([1.0, 1.0, 2.0]), TOL)
    assert not comp.passed
    assert comp.mismatches[0].nan_mismatch == 1
    assert comp.mismatches[0].abs_index == (1,)
    comp = compare(torch.tensor([math.inf]), torch.tensor([1.0]), TOL)
    assert not comp.passed
    assert compare(torch.tensor([math.inf]), torch.tensor([math.inf]), TOL).passed


def test_shape_and_key_mismatches():
    comp = compare({"x": torch.zeros(2, 3), "y": torch.zeros(1)}, {"x": torch.zeros(3, 2), "z": torch.zeros(1)}, TOL)
    reasons = {m.path: m.reason for m in comp.mismatches}
    assert reasons == {"x": "shape", "z": "missing", "y": "unexpected"}


def test_tolerance_is_atol_plus_rtol():
    tol = Tolerance(1e-3, 1e-5, "test")
    assert compare(torch.tensor([1000.0 + 0.9]), torch.tensor([1000.0]), tol).passed
    assert not compare(torch.tensor([1000.0 + 1.1]), torch.tensor([1000.0]), tol).passed


def test_overrides_carry_reasons_and_defaults_follow_torch_testing():
    assert tolerance_for("anything") == Tolerance(1.3e-6, 1e-5)
    for name, tol in OVERRIDES.items():
        assert tol.reason, name
        assert "default" not in tol.reason, name


def test_seeded_restores_the_callers_rng():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    with seeded(123):
        a = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeded(123):
        assert torch.equal(torch.rand(3), a)


def test_report_marks_failures_and_uncovered(tmp_path):
    ok = CheckRecord.new("forward.eval_outputs", "forward", "single:tiny", TOL)
    ok.add(compare(torch.ones(2), torch.ones(2), TOL))
    bad = CheckRecord.new("gradient.grads", "gradient", "single:tiny", TOL)
    planted = torch.ones(2, 2)
    planted[0, 1] = 2
    bad.add(compare({"w": planted}, {"w": torch.ones(2, 2)}, TOL, path="grad"))
    records = [ok, bad, not_covered("onnx", "single:*", "exporter not there")]
    jpath, mpath = write_reports(tmp_path, records, [], {"profile": "test", "seconds": 0})
    doc = json.loads(jpath.read_text())
    by_name = {c["name"]: c for c in doc["checks"]}
    assert by_name["forward.eval_outputs"]["passed"] is True
    assert by_name["gradient.grads"]["passed"] is False
    assert "grad[w]" in by_name["gradient.grads"]["failures"][0]
    assert "[0, 1]" in by_name["gradient.grads"]["failures"][0]
    assert by_name["onnx: not yet covered"]["passed"] is False
    for field in ("name", "category", "model", "max_abs_err", "max_rel_err", "atol", "rtol", "examples", "passed"):
        assert field in by_name["gradient.grads"]
    md = mpath.read_text()
    assert "**FAIL**" in md
    assert "not yet covered" in md
    assert "## onnx" in md
    assert doc["summary"]["all_passed"] is False
