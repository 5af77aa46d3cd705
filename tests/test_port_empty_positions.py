"""Empty history positions (every code 0, every number 0: the legacy's left padding) are aggregated once
(``stacks.DEDUPE_EMPTY_POSITIONS``) in eval and in the fast path's training: the same values, bit for bit, in
both networks; gradients equal the plain computation's (exactly in float64, up to fp32 summation order in
float32); the chains really run on fewer positions there and on every position in the exact path's training
(the legacy's operation order); positions that only look padded (masked, but with codes) are computed, and
nothing is deduplicated under tracing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_port.nn import blocks, stacks
from parity.tolerances import tolerance_for
from tests.test_port_memory import KIND_IDS, KINDS, _inputs, _network

EXACT = {"rtol": 0, "atol": 0}
# float32 gradients: the sums lose terms that are exact zeros, so they associate differently -- the parity suite's
# tolerance for gradient sums in another association order; the float64 comparison below shows the sums are the same
_GRAD = tolerance_for("gradient.grads")
SUMMATION_ORDER = {"rtol": _GRAD.rtol, "atol": _GRAD.atol}


def _run(net, args, y, mode: str, dedupe: bool, monkeypatch) -> dict:
    monkeypatch.setattr(stacks, "DEDUPE_EMPTY_POSITIONS", dedupe)
    getattr(net, mode)()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    scores, ensemble = net(*args)
    loss = F.cross_entropy(scores, y, reduction="sum")
    loss.backward()
    return {"scores": scores.detach(), "ensemble": ensemble.detach(), "rng": torch.get_rng_state(),
            "grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("legacy_rng", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("kind", "cfg"), KINDS, ids=KIND_IDS)
def test_empty_positions_aggregated_once_give_the_same_values_and_gradients(kind, cfg, mode, legacy_rng,
                                                                            monkeypatch):
    net = _network(kind, cfg, legacy_rng=legacy_rng)
    args, y = _inputs(kind, cfg)
    plain = _run(net, args, y, mode, False, monkeypatch)
    deduped = _run(net, args, y, mode, True, monkeypatch)
    for key in ("scores", "ensemble", "rng"):
        torch.testing.assert_close(deduped[key], plain[key], **EXACT, msg=lambda m, key=key: f"{key}: {m}")
    assert plain["grads"].keys() == deduped["grads"].keys()
    # the exact path's training aggregates every position, forward and backward: bit-equal
    tol = EXACT if (mode == "train" and legacy_rng) else SUMMATION_ORDER
    for name, g in plain["grads"].items():
        torch.testing.assert_close(deduped["grads"][name], g, **tol, msg=lambda m, name=name: f"{name}: {m}")
    # float64: the same sums without rounding -- the gradients agree to the last few bits
    net64 = net.double()
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    plain64 = _run(net64, args64, y, mode, False, monkeypatch)
    deduped64 = _run(net64, args64, y, mode, True, monkeypatch)
    for name, g in plain64["grads"].items():
        torch.testing.assert_close(deduped64["grads"][name], g, rtol=1e-12, atol=1e-14,
                                   msg=lambda m, name=name: f"float64 {name}: {m}")


def _chain_rows(monkeypatch) -> list[int]:
    """Record the number of positions every categorical chain call aggregates."""
    seen: list[int] = []
    for name in ("aggregate_codes", "aggregate_codes_recomputed"):
        original = getattr(blocks.FeatureAggregation, name)

        def wrapped(self, codes, *a, _original=original, **k):
            seen.append(codes.numel() // codes.shape[-1])
            return _original(self, codes, *a, **k)

        monkeypatch.setattr(blocks.FeatureAggregation, name, wrapped)
    return seen


@pytest.mark.parametrize(("mode", "legacy_rng", "deduplicated"),
                         [("eval", True, True), ("eval", False, True), ("train", False, True), ("train", True, False)],
                         ids=["eval-exact", "eval-fast", "train-fast", "train-exact (legacy order)"])
def test_the_chains_run_on_the_distinct_positions_only(mode, legacy_rng, deduplicated, monkeypatch):
    kind, cfg = KINDS[0]
    net = _network(kind, cfg, legacy_rng=legacy_rng)
    args, y = _inputs(kind, cfg)
    x_cat, x_num = args[0], args[1]
    empty = ((x_cat == 0).all(-1) & (x_num == 0).all(-1)).sum().item()
    assert empty >= 2, "the test inputs must hold padded positions"
    seen = _chain_rows(monkeypatch)
    _run(net, args, y, mode, True, monkeypatch)
    n_positions = x_cat.shape[0] * x_cat.shape[1]
    assert seen == [n_positions - empty + 1 if deduplicated else n_positions]
    seen.clear()
    _run(net, args, y, mode, False, monkeypatch)
    assert seen == [n_positions]


def test_masked_positions_with_codes_are_computed_not_deduplicated(monkeypatch):
    """Deduplication is by value, not by the padding mask: a masked position holding codes is aggregated
    (it still takes MoE capacity in its position's group) and the values equal the plain computation's."""
    kind, cfg = KINDS[0]
    net = _network(kind, cfg, legacy_rng=False)
    (x_cat, x_num, x_eng, t, am, kpm), y = _inputs(kind, cfg)
    x_cat = x_cat.clone()
    x_cat[kpm[:, :-1]] = 3.0  # every masked position holds code 3: only positions with codes 0 and numbers 0 are empty
    args = (x_cat, x_num, x_eng, t, am, kpm)
    seen = _chain_rows(monkeypatch)
    deduped = _run(net, args, y, "train", True, monkeypatch)
    assert seen == [x_cat.shape[0] * x_cat.shape[1]]  # nothing is empty: plain computation
    plain = _run(net, args, y, "train", False, monkeypatch)
    torch.testing.assert_close(deduped["scores"], plain["scores"], **EXACT)


class _Scores(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_cat, x_num, x_eng, time_seq, key_padding_mask):
        return self.net(x_cat, x_num, x_eng, time_seq, None, key_padding_mask)[0]


def test_no_deduplication_under_tracing(monkeypatch):
    kind, cfg = KINDS[0]
    net = _network(kind, cfg).eval()
    args, _ = _inputs(kind, cfg)
    seen = _chain_rows(monkeypatch)
    monkeypatch.setattr(stacks, "DEDUPE_EMPTY_POSITIONS", True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and tracer warnings
        traced = torch.jit.trace(_Scores(net), (*args[:4], args[5]), check_trace=False)
    assert seen == [args[0].shape[0] * args[0].shape[1]]
    del traced


def test_exact_training_aggregates_every_position(monkeypatch):
    """The exact path's training runs the recomputed rows-first chains on every position, in the forward and in
    the backward's recomputation: the legacy's operation order. (A forward over the distinct positions only was
    bit-equal on one machine and not on another: MKL's AVX-512 path rounds a matmul over fewer rows differently.)"""
    kind, cfg = KINDS[2]  # single, wide: every aggregation layer has a width
    net = _network(kind, cfg)
    args, y = _inputs(kind, cfg)
    x_cat, x_num = args[0], args[1]
    n_positions = x_cat.shape[0] * x_cat.shape[1]
    empty = ((x_cat == 0).all(-1) & (x_num == 0).all(-1)).sum().item()
    assert empty >= 2  # the inputs have empty positions to skip, so the test can fail
    calls: list[int] = []
    original = blocks._codes_chain_rows

    def recording(idx, table, params, pad, d_slice=None):
        calls.append(idx.numel() // x_cat.shape[-1])
        return original(idx, table, params, pad, d_slice)

    monkeypatch.setattr(blocks, "_codes_chain_rows", recording)
    _run(net, args, y, "train", True, monkeypatch)
    assert len(calls) >= 2  # the forward and the recomputation in backward
    assert all(c == n_positions for c in calls)
