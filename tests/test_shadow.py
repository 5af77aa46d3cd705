"""The shadow comparison (`tsa-verify MODEL_DIR --requests R --responses S`, parity/verify/shadow.py), run in-process with
the reproduced legacy handler as the endpoint (`--endpoint reference`)."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from parity import endpoint as E
from parity.verify import shadow
from parity.verify.cli import main as verify_main

FIX = E.FIXTURE_DIR
MODEL = str(E.MODEL_DIR)


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the handler's model_fn sets one thread


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(tmp_path, requests, responses, *extra):
    out = tmp_path / "out"
    rc = verify_main([MODEL, "--requests", str(requests), "--responses", str(responses), "--endpoint", "reference",
                      "--out", str(out), *extra])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return rc, report


def test_replaying_the_fixtures_through_the_reference_passes(tmp_path, capsys):
    rc, report = _run(tmp_path, FIX / "requests.jsonl", FIX / "responses.jsonl")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert report["verdict"] == "pass" and report["count"] == 80 and report["matched_by"] == "id"
    assert report["kinds"]["legacy"] == report["kinds"]["endpoint"] == {"score": 41, "sanity": 13, "nan": 6, "crash": 20}
    assert report["refusals"]["crashed_both"] == 20 == report["refusals"]["same_message"]
    assert report["refusals"]["sanity_failures_both"] == 13 and report["refusals"]["nan_both"] == 6
    assert report["score_diff"]["requests"] == 41 and report["score_diff"]["max"] < 1e-6
    assert report["drift"]["psi"]["psi"] < 1e-9 and report["drift"]["ks"]["pvalue"] > 0.99
    assert all(d["flips"] == 0 for d in report["decisions"]["percentile"] + report["decisions"]["score"])
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Shadow comparison: `reference`")
    assert "tsa-verify: PASS" in out


def test_a_tampered_responses_file_fails_naming_the_ids(tmp_path, capsys):
    pairs = E.fixture_records()[:30]
    moved = {0: 0.01, 4: -0.02, 21: 0.05}  # scored requests whose recorded legacy-score moves
    resps = []
    for _, resp in pairs:
        resp = json.loads(json.dumps(resp))
        if resp["id"] in moved:
            fields = resp["answer"]["predictions"][0]
            fields["legacy-score"] = repr(float(fields["legacy-score"]) + moved[resp["id"]])
            resp["prediction"] = fields["legacy-score"]
        resps.append(resp)
    resps[3]["answer"]["predictions"][0]["score-percentile"] = "0.95"  # id 3 was 0.999: flips at 0.999
    reqs = _write(tmp_path / "r.jsonl", [q for q, _ in pairs])
    rc, report = _run(tmp_path, reqs, _write(tmp_path / "s.jsonl", resps))
    out = capsys.readouterr().out
    assert rc == 1
    assert report["verdict"] == "fail"
    assert sorted(report["failing_ids"]) == [0, 3, 4, 21]
    for i in (0, 4, 21):
        assert f"FAIL: request {i} (" in out and "legacy-score" in out
    assert "FAIL: request 3 (percentile_above_last_row): score-percentile '0.999' != '0.95'" in out
    flips = {d["threshold"]: d["ids"] for d in report["decisions"]["percentile"]}
    assert flips[0.999] == [3] and flips[0.99] == [3] and flips[0.9] == []
    worst = [w["id"] for w in report["score_diff"]["worst"][:3]]
    assert worst == [21, 4, 0]


def test_plain_jsonl_bodies_and_answers_matched_by_line_order(tmp_path):
    pairs = [(q, r) for q, r in E.fixture_records() if r["ok"] and q["content_type"] == q["accept"] ==
             "application/json"][:12]
    (tmp_path / "bodies.jsonl").write_text("".join(q["body"] + "\n" for q, _ in pairs))
    answers = _write(tmp_path / "answers.jsonl", [r["answer"] for _, r in pairs])
    rc, report = _run(tmp_path, tmp_path / "bodies.jsonl", answers)
    assert rc == 0, report["reasons"]
    assert report["matched_by"] == "line order" and report["count"] == 12


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text('{"id": 1, "body": "{}"}\nnot json\n'), "line 2 is not JSON"),
    (lambda p: p.write_text('{"id": 1, "body": "{}"}\n{"a": 1}\n'), "mixes the two formats"),
    (lambda p: p.write_text('{"id": 1, "body": {"a": 1}}\n'), "'body' must be the request string as sent"),
    (lambda p: p.write_text(""), "no requests in it"),
])
def test_malformed_request_logs_are_refused_in_one_line(tmp_path, capsys, make, message):
    make(tmp_path / "r.jsonl")
    rc, _ = _run(tmp_path, tmp_path / "r.jsonl", FIX / "responses.jsonl")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and err[0].startswith("tsa-verify: error: ")


def test_malformed_responses_and_mismatches_are_refused_in_one_line(tmp_path, capsys):
    pairs = E.fixture_records()[:5]
    reqs = _write(tmp_path / "r.jsonl", [q for q, _ in pairs])
    cases = [
        ([r for _, r in pairs[:4]], "1 request id(s) without a response (4)"),
        ([r for _, r in pairs] + [dict(pairs[0][1], id=99)], "1 response id(s) without a request (99)"),
        ([{"predictions": []}], "answer['predictions'] is not a list of one dict"),
        ([{"id": 0, "ok": False}], "a failure without stage, error_type, error"),
        ([dict(r, id=0) for _, r in pairs[:2]], "id(s) repeated: 0"),
    ]
    for resps, message in cases:
        rc, _ = _run(tmp_path, reqs, _write(tmp_path / "s.jsonl", resps))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (message, err)
    (tmp_path / "bodies.jsonl").write_text("{}\n{}\n{}\n")
    rc, _ = _run(tmp_path, tmp_path / "bodies.jsonl", _write(tmp_path / "a.jsonl", [pairs[0][1]["answer"]] * 2))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has 3 requests but" in err[0] and "has 2 responses" in err[0]


def test_a_missing_model_folder_and_an_absent_port_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    rc = verify_main([str(tmp_path / "nowhere"), "--requests", str(FIX / "requests.jsonl"), "--responses",
                      str(FIX / "responses.jsonl"), "--endpoint", "reference", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nowhere: not a folder" in err[0]
    monkeypatch.setitem(sys.modules, E.PORT_MODULE, None)  # import raises ImportError, port present or not
    rc = verify_main([MODEL, "--requests", str(FIX / "requests.jsonl"), "--responses", str(FIX / "responses.jsonl"),
                      "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "endpoint port: lightning_port.serving.inference not importable" in err[0] and "--endpoint reference" in err[0]


def test_psi_on_a_hand_worked_example():
    """expected 0..9 (ten values): bins at the deciles, edges halfway between neighbours: 0.5, 1.5, ..., 8.5, so
    every expected value has its own bin (share 0.1). actual: [0, 0, 0, 0, 0, 5, 6, 7, 8, 9]: shares 0.5 in the
    first bin, eps = 1e-4 in bins 1-4 (empty), 0.1 in bins 5-9.
    PSI = (0.5 - 0.1) ln 5 + 4 (1e-4 - 0.1) ln(1e-4 / 0.1) + 5 * 0 = 0.4 ln 5 + 4 * 0.0999 * ln 1000."""
    got = shadow.psi(np.arange(10.0), np.array([0, 0, 0, 0, 0, 5, 6, 7, 8, 9.0]))
    assert got["edges"] == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]
    want = 0.4 * math.log(5) + 4 * 0.0999 * math.log(1000)
    assert got["psi"] == pytest.approx(want, rel=1e-12)
    assert shadow.psi(np.arange(10.0), np.arange(10.0))["psi"] == 0.0


def test_ks_matches_scipy():
    """The statistic against scipy's two-sample test; the p-value against scipy's Kolmogorov limit distribution
    (kstwobign) at sqrt(n m / (n + m)) D."""
    from scipy import stats

    rng = np.random.default_rng(0)
    for a, b in [(rng.normal(size=41), rng.normal(0.3, 1, size=37)), (rng.normal(size=200), rng.normal(size=150)),
                 (np.round(rng.normal(size=60), 1), np.round(rng.normal(size=60), 1))]:  # the last one with ties
        mine = shadow.ks_2samp(a, b)
        ref = stats.ks_2samp(a, b)
        assert mine["statistic"] == pytest.approx(ref.statistic, abs=1e-15)
        en = len(a) * len(b) / (len(a) + len(b))
        assert mine["pvalue"] == pytest.approx(stats.kstwobign.sf(math.sqrt(en) * ref.statistic), rel=1e-9, abs=1e-15)
    assert shadow.ks_2samp(np.arange(5.0), np.arange(5.0)) == {"statistic": 0.0, "pvalue": 1.0, "n": [5, 5],
                                                               "method": "asymptotic (Kolmogorov distribution)"}
