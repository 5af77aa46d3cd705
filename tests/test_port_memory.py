"""Training-memory options of the port compute the same function with the same random draws:

- the embedding + FeatureAggregation chains of the order stack are recomputed in backward
  (always, in training; ``stacks.RECOMPUTE_AGGREGATION``) -- same loss and gradients;
- ``activation_checkpointing=True`` recomputes every attention layer in backward with the RNG state
  replayed -- same loss, scores, gradients and global RNG state after forward + backward;
- neither is active in eval (or under tracing, which the export tests cover end to end).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification
from lightning_port.config import TSAConfig
from lightning_port.nn import DualSequenceNetwork, SingleSequenceNetwork, blocks, stacks

TINY = {
    "n_cat_features": 6, "n_num_features": 5, "n_classes": 2, "n_embedding": 40, "seq_len": 7,
    "n_engineered_num_features": 2, "dim_embedding_table": 8, "dim_attn_feedforward": 16,
    "num_heads": 2, "dropout": 0.3, "n_layers_order": 2, "n_layers_feature": 2, "emb_tbl_use_bias": 1,
    "use_moe": True, "num_experts": 3, "use_time_seq": True,
}
# wide enough (n_cat >= 32) that every FeatureAggregation layer has a non-zero width
WIDE = {**TINY, "n_cat_features": 40, "n_num_features": 33, "n_embedding": 120}
B = 12


def _sequence(g: torch.Generator, cfg: dict) -> tuple:
    L, n_cat, n_num = cfg["seq_len"], cfg["n_cat_features"], cfg["n_num_features"]
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    not_padded = (torch.arange(L)[None, :] >= (L - lengths)[:, None]).float()
    n_codes = cfg["n_embedding"] - n_num
    x_cat = torch.randint(1, n_codes + 1, (B, L, n_cat), generator=g).float() * not_padded[..., None]
    x_num = torch.randn(B, L, n_num, generator=g) * not_padded[..., None]
    time_seq = (torch.rand(B, L, 1, generator=g) * 1e6) * not_padded[..., None]
    kpm = torch.logical_not(F.pad(not_padded, (0, 1), value=1.0).bool())
    return x_cat, x_num, time_seq, kpm


def _inputs(kind: str, cfg: dict, seed: int = 7) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x_eng = torch.randn(B, cfg["n_engineered_num_features"], generator=g)
    y = torch.randint(0, cfg["n_classes"], (B,), generator=g)
    if kind == "single":
        x_cat, x_num, t, kpm = _sequence(g, cfg)
        return (x_cat, x_num, x_eng, t, None, kpm), y
    c = _sequence(g, cfg)
    k = _sequence(g, cfg)
    # a few card histories hold only the current order (the gate zeroes them)
    kpm_k = k[3].clone()
    kpm_k[:3] = True
    kpm_k[:3, -2:] = False
    return (c[0], c[1], c[2], k[0], k[1], k[2], x_eng, None, c[3], kpm_k), y


def _network(kind: str, cfg: dict, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = TSAConfig(**{**cfg, **overrides})
    return SingleSequenceNetwork(config) if kind == "single" else DualSequenceNetwork(config)


def _train_step(net: torch.nn.Module, args: tuple, y: torch.Tensor, seed: int = 123) -> dict:
    """One forward + backward from a fixed RNG state; everything a train step produces."""
    net.train()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    scores, ensemble = net(*args)
    loss = F.cross_entropy(scores, y, reduction="sum")
    loss.backward()
    return {"loss": loss.detach(), "scores": scores.detach(), "ensemble": ensemble.detach(),
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()},
            "rng": torch.get_rng_state()}


EXACT = {"rtol": 0, "atol": 0}
ROUNDING = {"rtol": 1e-5, "atol": 1e-6}  # fp32 summation order


def _assert_same(a: dict, b: dict, exact: bool) -> None:
    """Values and RNG state always bit-equal; gradients bit-equal or (``exact=False``) equal up
    to fp32 summation order."""
    for key in ("loss", "scores", "ensemble"):
        torch.testing.assert_close(a[key], b[key], **EXACT, msg=lambda m, key=key: f"{key}: {m}")
    kw = EXACT if exact else ROUNDING
    assert a["grads"].keys() == b["grads"].keys()
    for name, ga in a["grads"].items():
        gb = b["grads"][name]
        assert (ga is None) == (gb is None), name
        if ga is not None:
            torch.testing.assert_close(ga, gb, **kw, msg=lambda m, name=name: f"grad {name}: {m}")
    assert torch.equal(a["rng"], b["rng"]), "the global RNG ends in a different state"


@pytest.fixture
def stored_aggregation(monkeypatch):
    """Run with the aggregation chains' activations stored (no recomputation)."""
    monkeypatch.setattr(stacks, "RECOMPUTE_AGGREGATION", False)


KINDS = [("single", TINY), ("dual", TINY), ("single", WIDE), ("dual", WIDE)]
KIND_IDS = ["single-tiny", "dual-tiny", "single-wide", "dual-wide"]


@pytest.fixture(params=["one-slice", "many-slices"])
def slices(request, monkeypatch):
    """Recompute the chains in one slice of D, or in one slice per d (the most slices)."""
    monkeypatch.setattr(blocks, "RECOMPUTE_CHUNK_BYTES", 1 << 40 if request.param == "one-slice" else 1)
    return request.param


@pytest.mark.parametrize(("kind", "cfg"), KINDS, ids=KIND_IDS)
def test_aggregation_recompute_gives_identical_gradients(kind, cfg, slices, monkeypatch):
    net = _network(kind, cfg)
    args, y = _inputs(kind, cfg)
    monkeypatch.setattr(stacks, "RECOMPUTE_AGGREGATION", False)
    stored = _train_step(net, args, y)
    monkeypatch.setattr(stacks, "RECOMPUTE_AGGREGATION", True)
    recomputed = _train_step(net, args, y)
    _assert_same(stored, recomputed, exact=False)  # values exact; gradients up to summation order
    assert stored["grads"]["embedding.weight"].abs().sum() > 0


@pytest.mark.parametrize(("n_cat", "n_num"), [(40, 33), (6, 5)])
def test_aggregation_chain_directly_recomputed_equals_stored(n_cat, n_num, slices):
    """The chains alone, recomputed vs stored: bit-equal outputs and table gradient (each slice of
    D owns its own gradient entries), weight gradients equal up to fp32 summation order."""
    torch.manual_seed(0)
    D = 8
    order = stacks.OrderAttentionModule(n_cat, n_num, D, 16, 2, 0.0, 1, False, 1, True, True)
    table = torch.randn(2 * n_num + 20, D, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, table.shape[0] - n_num - 1, (5, 4, n_cat), generator=g)
    x_num = torch.randn(5, 4, n_num, generator=g)
    results = []
    for recompute in (False, True):
        table.grad = None
        order.zero_grad(set_to_none=True)
        rows = stacks.numerical_rows(table, n_num)
        if recompute:
            cat = order.aggregate_cat.aggregate_codes_recomputed(codes, table, padding_idx=0)
            num = order.aggregate_num.project_embeddings_recomputed(rows, x_num)
        else:
            cat = order.aggregate_cat.aggregate_codes(codes, table, padding_idx=0)
            num = order.aggregate_num.project_embeddings(rows, x_num)
        out = torch.cat([cat, num], -1)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        params = [*order.aggregate_cat.parameters(), *order.aggregate_num.parameters()]
        results.append((out.detach(), table.grad.clone(), [p.grad for p in params]))
    (o0, t0, g0), (o1, t1, g1) = results
    assert torch.equal(o0, o1)
    torch.testing.assert_close(t0, t1, **ROUNDING)
    assert torch.all(t0[0] == 0) and torch.all(t1[0] == 0)  # padding row: no gradient
    for a, b in zip(g0, g1):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **ROUNDING)


@pytest.mark.parametrize(("kind", "cfg"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("aggregation", ["recomputed", "stored"])
def test_activation_checkpointing_replays_the_same_train_step(kind, cfg, aggregation, monkeypatch):
    monkeypatch.setattr(stacks, "RECOMPUTE_AGGREGATION", aggregation == "recomputed")
    plain = _network(kind, cfg)
    ckpt = _network(kind, cfg, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    args, y = _inputs(kind, cfg)
    a = _train_step(plain, args, y)
    b = _train_step(ckpt, args, y)
    _assert_same(a, b, exact=True)
    # dropout and coin flips really are drawn: another seed gives another step
    c = _train_step(plain, args, y, seed=124)
    assert not torch.equal(a["loss"], c["loss"])
    # the RNG state after the step differs from the one before (draws happened, then not redrawn)
    torch.manual_seed(123)
    assert not torch.equal(torch.get_rng_state(), a["rng"])


@pytest.mark.parametrize(("kind", "cfg"), KINDS[:2], ids=KIND_IDS[:2])
def test_activation_checkpointing_matches_across_two_steps(kind, cfg):
    """Two forward/backward passes in a row (RNG carried over): still the same."""
    plain = _network(kind, cfg)
    ckpt = _network(kind, cfg, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    args, y = _inputs(kind, cfg)
    out = []
    for net in (plain, ckpt):
        torch.manual_seed(5)
        steps = []
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            net.train()
            scores, _ = net(*args)
            F.cross_entropy(scores, y).backward()
            steps.append((scores.detach(), net.embedding.weight.grad.clone()))
        out.append((steps, torch.get_rng_state()))
    (sa, ra), (sb, rb) = out
    for (s1, g1), (s2, g2) in zip(sa, sb):
        assert torch.equal(s1, s2) and torch.equal(g1, g2)
    assert torch.equal(ra, rb)


def _count_checkpoint_calls(monkeypatch) -> list:
    calls = []
    real = stacks.checkpoint

    def counting(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(stacks, "checkpoint", counting)
    return calls


@pytest.mark.parametrize(("kind", "cfg"), KINDS[:2], ids=KIND_IDS[:2])
def test_checkpointing_used_in_training(kind, cfg, monkeypatch):
    calls = _count_checkpoint_calls(monkeypatch)
    net = _network(kind, cfg, activation_checkpointing=True)
    args, y = _inputs(kind, cfg)
    _train_step(net, args, y)
    # dual: cid and ccid order stacks, plus the one-layer gate order stack run twice
    n_layers = cfg["n_layers_order"] * (1 if kind == "single" else 2) + (2 if kind == "dual" else 0) \
        + cfg["n_layers_feature"]
    assert len(calls) == n_layers
    assert all(c["use_reentrant"] is False and c["preserve_rng_state"] is True for c in calls)


@pytest.mark.parametrize(("kind", "cfg"), KINDS[:2], ids=KIND_IDS[:2])
def test_checkpointing_inactive_in_eval_and_without_grad(kind, cfg, monkeypatch):
    calls = _count_checkpoint_calls(monkeypatch)
    net = _network(kind, cfg, activation_checkpointing=True, moe_eval_policy="threshold")
    args, _ = _inputs(kind, cfg)
    net.eval()
    with torch.no_grad():
        s1, _ = net(*args)
    s2, _ = net(*args)  # eval with autograd on: still the plain path
    net.train()
    with torch.no_grad():
        torch.manual_seed(0)
        net(*args)
    assert calls == []
    plain = _network(kind, cfg, moe_eval_policy="threshold").eval()
    with torch.no_grad():
        assert torch.equal(plain(*args)[0], s1)
    assert torch.equal(s1, s2.detach())


def test_checkpointing_inactive_under_tracing(monkeypatch):
    calls = _count_checkpoint_calls(monkeypatch)
    net = _network("single", {**TINY, "dropout": 0.0}, activation_checkpointing=True,
                   moe_eval_policy="threshold")
    args, _ = _inputs("single", TINY)
    net.train()
    assert stacks.checkpointing_active(net.order)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert not stacks.checkpointing_active(net.order)
    monkeypatch.undo()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not stacks.checkpointing_active(net.order)
    assert calls == []


def test_config_option_validated_and_saved():
    assert TSAConfig(**TINY).activation_checkpointing is False
    assert TSAConfig(**TINY, activation_checkpointing=1).activation_checkpointing is True
    with pytest.raises(ValueError, match="activation_checkpointing must be a bool"):
        TSAConfig(**TINY, activation_checkpointing="yes")
    with pytest.raises(ValueError, match="activation_checkpointing must be a bool"):
        TSAConfig(**TINY, activation_checkpointing=2)
    for cls in (TemporalSelfAttentionClassification, DualSequenceTSA):
        m = cls(**TINY, activation_checkpointing=True)
        assert m.hparams.activation_checkpointing is True
        assert m.config.activation_checkpointing is True
        stack_flags = {mod.activation_checkpointing for mod in m.network.modules()
                       if isinstance(mod, (stacks.OrderAttentionModule, stacks.FeatureAttentionModule))}
        assert stack_flags == {True}
        off = cls(**TINY)
        assert off.hparams.activation_checkpointing is False
        assert off.network.state_dict().keys() == m.network.state_dict().keys()


def test_sliced_recompute_replays_under_the_forward_autocast_state():
    """The chains are recomputed in backward under the autocast state of their forward."""
    seen = []

    def fn(x, w, d_slice=None):
        seen.append((d_slice, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        if d_slice is not None:
            x = x[:, d_slice[0]: d_slice[1]]
        return (x * w).sum(0)

    x = torch.randn(3, 4)
    w = torch.randn(3, 1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blocks._SlicedRecompute.apply(fn, 0, 2, x, w)
    out.sum().backward()
    assert seen[0] == (None, True, torch.bfloat16)
    assert seen[1:] == [((0, 2), True, torch.bfloat16), ((2, 4), True, torch.bfloat16)]
    torch.testing.assert_close(w.grad, x.sum(1, keepdim=True))


def test_sliced_recompute_gradient_flows_to_torch_autograd_grad():
    """Parameters get their gradients through the Function's outputs (autograd.grad works)."""
    net = _network("single", TINY)
    args, y = _inputs("single", TINY)
    net.train()
    torch.manual_seed(1)
    loss = F.cross_entropy(net(*args)[0], y)
    params = list(net.order.aggregate_cat.parameters()) + [net.embedding.weight]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert grads[-1] is not None and grads[-1].abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
