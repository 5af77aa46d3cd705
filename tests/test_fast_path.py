"""The opt-in fast path (``legacy_rng=False``, issue 12 item 1) and ``compile=True``.

What the fast path keeps: the function (eval outputs equal the exact path's bit for bit, training without
random draws equals the legacy's), the parameters, the ``state_dict`` keys and checkpoints. What it gives
up: the legacy random stream in training (its dropout masks come from another source, at the legacy rates).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _port_helpers import OUTPUT_TOL, lightning_batch
from scipy.stats import binomtest
from torch.utils.data import DataLoader

from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification
from lightning_port.nn import draws
from lightning_port.weight_map import legacy_to_port, port_to_legacy
from parity import strategies as S
from parity.cases import TINY, case
from parity.fixtures import LEGACY_DIR, load_case
from parity.pairs import make_pair
from reference.training import model_inputs

SINGLE = load_case(LEGACY_DIR / "single_small")
DUAL = load_case(LEGACY_DIR / "dual_small")
GRAD_TOL = {"rtol": 1e-3, "atol": 1e-5}  # the gradient category's tolerance (sums in another order)
ALPHA = 1e-6  # false-alarm rate of each statistical test


def module_for(fixture, **kw):
    cls = TemporalSelfAttentionClassification if fixture.kind == "single" else DualSequenceTSA
    m = cls(**fixture.kwargs, **kw)
    m.network.load_state_dict(legacy_to_port(fixture.state_dict, m.config, fixture.kind))
    return m


def test_config_validates_legacy_rng_and_compile():
    with pytest.raises(ValueError, match="legacy_rng must be a bool"):
        TemporalSelfAttentionClassification(**SINGLE.kwargs, legacy_rng="no")
    with pytest.raises(ValueError, match="compile must be a bool"):
        TemporalSelfAttentionClassification(**SINGLE.kwargs, compile="yes")


@pytest.mark.parametrize("fixture", [SINGLE, DUAL], ids=["single", "dual"])
def test_same_parameters_keys_and_checkpoints(fixture, tmp_path):
    """Same seed -> the same initial weights under the same keys; a fast-path checkpoint carries
    ``legacy_rng=False``, reloads exactly, converts to the legacy layout, and can be switched back."""
    cls = TemporalSelfAttentionClassification if fixture.kind == "single" else DualSequenceTSA
    torch.manual_seed(3)
    exact = cls(**fixture.kwargs)
    torch.manual_seed(3)
    fast = cls(**fixture.kwargs, legacy_rng=False)
    assert list(exact.state_dict()) == list(fast.state_dict())
    for k, v in exact.state_dict().items():
        assert torch.equal(v, fast.state_dict()[k]), k
    samples = [{k: v[i] for k, v in lightning_batch(fixture).items()} for i in range(fixture.batch_size)]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(fast, DataLoader(samples, batch_size=4))
    path = tmp_path / "fast.ckpt"
    trainer.save_checkpoint(path)
    again = cls.load_from_checkpoint(path)
    assert again.hparams.legacy_rng is False and again.config.legacy_rng is False
    assert all(m.legacy_rng is False for m in again.network.modules() if isinstance(m, draws.RandomDraws))
    back = cls.load_from_checkpoint(path, legacy_rng=True)
    assert all(m.legacy_rng for m in back.network.modules() if isinstance(m, draws.RandomDraws))
    for k, v in fast.network.state_dict().items():
        assert torch.equal(v, again.network.state_dict()[k]), k
    legacy = port_to_legacy(again.network.state_dict(), again.config, fixture.kind)
    assert set(legacy) == set(fixture.state_dict)


@pytest.mark.parametrize("fixture", [SINGLE, DUAL], ids=["single", "dual"])
def test_eval_is_the_exact_path_coins_included(fixture):
    """In eval the fast path draws the legacy coins: outputs equal the exact path's bit for bit (and the
    recorded legacy outputs to the fixture tolerance)."""
    exact, fast = module_for(fixture).eval(), module_for(fixture, legacy_rng=False).eval()
    batch = lightning_batch(fixture)
    outs = []
    for m in (exact, fast):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(m(*m.batch_to_args(batch))[0])
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], fixture.expected["eval_seed7_scores"], **OUTPUT_TOL)


@pytest.mark.parametrize("overrides", [dict(use_moe=False, num_experts=1), dict(num_experts=1)],
                         ids=["feedforward", "one-expert"])
def test_without_dropout_training_gradients_equal_the_legacy(overrides, monkeypatch):
    """Dropout 0 and no coin that matters: the legacy training step is deterministic, and the fast path
    (here on F.scaled_dot_product_attention, its training attention on accelerators, switched on for CPU)
    gives the same loss and every gradient."""
    from lightning_port.nn import attention

    monkeypatch.setattr(attention.MultiheadAttention, "fused_train_on_cpu", True)
    calls = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = S.ModelConfig(dict(TINY, dropout=0.0, **overrides), "det")
    pair = make_pair(case("single:tiny"), config, init_seed=5, legacy_rng=False)
    batch = S.make_batch(config, "single", [7, 0, 3, 1, 5, 2], seed=4, time_scale=S.MAX_TIME)  # time factor matters
    args, kwargs = model_inputs(batch.batch, "single")
    grads = {}
    for side, model in (("legacy", pair.legacy), ("fast", pair.port)):
        model.train()
        torch.manual_seed(0)
        loss = F.cross_entropy(model(*args, **kwargs)[0], batch.batch["y"], reduction="sum")
        loss.backward()
        net = model if side == "legacy" else model.network
        grads[side] = (loss.detach(), {n: p.grad for n, p in net.named_parameters()})
    torch.testing.assert_close(grads["fast"][0], grads["legacy"][0], **OUTPUT_TOL)
    filled = {n: g if g is not None else torch.zeros_like(p)
              for (n, g), p in zip(grads["fast"][1].items(), pair.port.network.parameters())}
    as_legacy = port_to_legacy(filled, pair.port.config, "single")
    for k, g in grads["legacy"][1].items():
        if g is not None:
            torch.testing.assert_close(as_legacy[k], g, **GRAD_TOL, msg=lambda m, k=k: f"{k}: {m}")
    assert calls  # the fused training path ran


def test_fast_training_draws_other_masks_from_a_cheaper_source():
    """Same seed, dropout on: the exact path reproduces the legacy's training outputs, the fast path does
    not (other masks) and consumes the generator differently."""
    pair = make_pair(case("single:tiny"), S.ModelConfig(dict(TINY), "t"), init_seed=5)
    fast = make_pair(case("single:tiny"), S.ModelConfig(dict(TINY), "t"), init_seed=5, legacy_rng=False).port
    batch = S.make_batch(pair.config, "single", [7, 0, 3, 1, 5, 2], seed=4, time_scale=1e6)
    args, kwargs = model_inputs(batch.batch, "single")
    out, states = {}, {}
    for side, model in (("legacy", pair.legacy), ("exact", pair.port), ("fast", fast)):
        model.train()
        torch.manual_seed(0)
        out[side] = model(*args, **kwargs)[0].detach()
        states[side] = torch.random.get_rng_state()
    torch.testing.assert_close(out["exact"], out["legacy"], **OUTPUT_TOL)
    assert torch.equal(states["exact"], states["legacy"])
    assert not torch.allclose(out["fast"], out["legacy"], **OUTPUT_TOL)
    assert not torch.equal(states["fast"], states["legacy"])


@pytest.mark.parametrize("p", [0.1, 0.37])
def test_fast_dropout_keep_rate_and_scale(p):
    """Exact binomial test (false-alarm rate 1e-6) of the fast mask's keep rate against 1 - p, and the
    kept values scaled by 1/(1-p) like F.dropout; gradients flow through the same mask."""
    x = torch.ones(64, 128, 128, requires_grad=True)
    y = draws.fast_dropout(x, p)
    kept = int((y != 0).sum())
    assert binomtest(kept, y.numel(), 1 - p).pvalue > ALPHA
    torch.testing.assert_close(y[y != 0], torch.full((kept,), 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def _tiny_compile_case():
    config = S.ModelConfig(dict(TINY, n_layers_order=2, n_layers_feature=1, n_engineered_num_features=0,
                                num_experts=2, seq_len=5, n_cat_features=3, n_num_features=2), "compile")
    batch = S.make_batch(config, "single", [5, 0, 3, 1], seed=3, time_scale=1e6)
    return config, batch


@pytest.mark.slow
def test_compiled_exact_path_keeps_the_legacy_stream():
    """``compile=True`` with the legacy RNG (inductor, CPU): the same scores, loss, gradients and generator
    state as the eager exact path -- every dropout mask and coin drawn in program order."""
    config, batch = _tiny_compile_case()
    eager = make_pair(case("single:tiny"), config, init_seed=2).port
    compiled = make_pair(case("single:tiny"), config, init_seed=2, compile=True).port
    args, kwargs = model_inputs(batch.batch, "single")
    res = {}
    for name, m in (("eager", eager), ("compiled", compiled)):
        m.train()
        torch.manual_seed(1)
        scores = m(*args, **kwargs)[0]
        loss = F.cross_entropy(scores, batch.batch["y"], reduction="sum")
        loss.backward()
        res[name] = (scores.detach(), loss.detach(), {n: p.grad for n, p in m.network.named_parameters()},
                     torch.random.get_rng_state())
    assert "_compiled_network" in compiled.__dict__ and "_compiled_network" not in eager.__dict__
    torch.testing.assert_close(res["compiled"][0], res["eager"][0], **OUTPUT_TOL)
    torch.testing.assert_close(res["compiled"][1], res["eager"][1], **OUTPUT_TOL)
    for n, g in res["eager"][2].items():
        if g is not None:
            torch.testing.assert_close(res["compiled"][2][n], g, **GRAD_TOL, msg=lambda m, n=n: f"{n}: {m}")
    assert torch.equal(res["compiled"][3], res["eager"][3])
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod keys


def test_fast_path_traces_as_one_graph():
    """The fast path under dynamo + AOTAutograd (the inductor compile is measured in benchmarks): one graph,
    no break, and a training step runs."""
    config, batch = _tiny_compile_case()
    port = make_pair(case("single:tiny"), config, init_seed=2, legacy_rng=False).port.train()
    args, kwargs = model_inputs(batch.batch, "single")
    explained = torch._dynamo.explain(port.network)(*args, **kwargs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(port.network, backend="aot_eager")
    scores = compiled(*args, **kwargs)[0]
    F.cross_entropy(scores, batch.batch["y"], reduction="sum").backward()
    assert all(p.grad is not None for n, p in port.network.named_parameters() if "layers.0" in n)
