"""The `endpoint` parity category checks itself: it passes on an endpoint that answers like the reproduced legacy
handler, fails naming the request when one answer string is off, and reports the port as not run (failing) when
lightning_port.serving.inference cannot be imported."""

import sys
from types import SimpleNamespace

import pytest

from parity import endpoint as E
from parity.checks import RunContext
from parity.checks.endpoint import (
    check_endpoint_port_drawn,
    check_endpoint_port_recorded,
    check_endpoint_reference,
    check_endpoint_reference_drawn,
)
from reference import pytorch_inference_handler as H


@pytest.fixture(scope="module")
def ref():
    import torch

    threads = torch.get_num_threads()
    ep = E.reference_endpoint()
    yield ep
    torch.set_num_threads(threads)


def _shifted_percentile_output_fn(prediction, accept):
    """output_fn whose score-percentile is the NEXT table row's (off by one row), everything else unchanged."""
    answer = H.output_fn(prediction, accept)
    fields = answer["predictions"][0]
    table = H.percentile_score_list
    pcts = [str(row[1]) for row in table]
    if fields["score-percentile"] in pcts:
        i = pcts.index(fields["score-percentile"])
        fields["score-percentile"] = str(table[min(i + 1, len(table) - 1)][1])
    return answer


def _ctx(ref, port_functions):
    port = E.Endpoint("port:planted", port_functions, ref.model)
    factories = {"reference": lambda: ref, "port:onnx": lambda: port, "port:eager": lambda: port}
    return RunContext(profile="quick", extra={"endpoint_factories": factories}, shrink=False)


def test_checks_pass_on_an_endpoint_that_answers_like_the_reference(ref):
    ctx = _ctx(ref, H)  # the reproduced handler standing in for the port: every check must pass
    recs = (check_endpoint_reference(ctx) + check_endpoint_reference_drawn(ctx) + check_endpoint_port_recorded(ctx)
            + check_endpoint_port_drawn(ctx))
    assert [r.name for r in recs] == ["endpoint.reference_vs_recorded", "endpoint.reference_drawn_contract",
                                      "endpoint.port_onnx_vs_recorded", "endpoint.port_eager_vs_recorded",
                                      "endpoint.port_onnx_vs_reference_drawn", "endpoint.port_eager_vs_reference_drawn"]
    assert all(r.passed for r in recs), [(r.name, r.failures) for r in recs if not r.passed]
    assert recs[0].examples == 80 and recs[2].examples == 80
    assert "of 80 answers identical to the recording" in recs[0].notes


def test_a_percentile_off_by_one_row_fails_naming_the_request(ref):
    planted = SimpleNamespace(input_fn=H.input_fn, predict_fn=H.predict_fn, output_fn=_shifted_percentile_output_fn)
    ctx = _ctx(ref, planted)
    recorded = check_endpoint_port_recorded(ctx)
    assert all(r.status == "failed" for r in recorded)
    text = "\n".join(recorded[0].failures)
    assert "request 0 (normal): score-percentile '0.752' != '0.751'" in text
    assert "recorded requests answered differently: 0 (normal)" in recorded[0].failures[0]
    drawn = check_endpoint_port_drawn(ctx)
    assert all(r.status == "failed" for r in drawn)
    assert drawn[0].failures[0].startswith("minimal failing example:\nrequest recipe(seed=")
    assert "score-percentile" in drawn[0].failures[0]


def test_a_wrong_crash_message_fails_the_check(ref):
    def input_fn(body, content_type):
        if content_type != "application/json":
            raise ValueError(f"{content_type} is not supported")  # not the legacy's message
        return H.input_fn(body, content_type)

    planted = SimpleNamespace(input_fn=input_fn, predict_fn=H.predict_fn, output_fn=H.output_fn)
    rec = check_endpoint_port_recorded(_ctx(ref, planted))[0]
    assert rec.status == "failed"
    assert any("request 42 (crash_content_type_csv): crash error 'text/csv is not supported' != "
               "'text/csv not supported by script!'" in f for f in rec.failures)


def test_without_the_port_module_the_port_checks_fail_as_not_run(ref, monkeypatch):
    monkeypatch.setitem(sys.modules, E.PORT_MODULE, None)  # import raises ImportError, port present or not
    ctx = RunContext(profile="quick", extra={"endpoint_factories": {"reference": lambda: ref}})
    recs = check_endpoint_port_recorded(ctx) + check_endpoint_port_drawn(ctx)
    assert len(recs) == 4
    for r in recs:
        assert not r.passed and r.failing and r.status == "failed"
        assert r.failures[0].startswith("not run: lightning_port.serving.inference not importable")
