"""The lean last layer (issue 13 item 1, issue 12 item 1): each stack's last layer computes its summary
token alone, and with the legacy RNG every random draw of the full layer still happens at its full shape.

Shown against the legacy model (``reference/``) on the same weights: outputs equal to the fixture tolerance,
the global generator left exactly where the legacy forward (+ backward) leaves it, and a second forward under
that continuing state equal too; and against the port's own full computation
(``stacks.LEAN_LAST_LAYER = False``): outputs, every gradient and the generator state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_port.module import key_padding_mask
from lightning_port.nn import stacks
from parity import strategies as S
from parity.cases import TINY, TINY_DUAL, TINY_PLAIN, case
from parity.pairs import make_pair
from reference.training import model_inputs

OUTPUT_TOL = {"rtol": 1e-4, "atol": 1e-5}  # the recorded-fixture tolerance (fp32 rounding across the stack)
# lean vs full port: the same operations on fewer rows; only the matmul blocking of the smaller products differs
SELF_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}  # gradients: sums over the batch in a different blocking

LENGTHS = [7, 0, 3, 1, 5, 2]  # full, fully padded, partial, current only (seq_len 7)
CONFIGS = {
    # (kind, legacy kwargs): what the last layer's feed-forward is, and which draws it makes
    "moe3": ("single", dict(TINY)),  # top-2 MoE: (T, B) coins; dropout on weights, drop1, drop2
    "moe1": ("single", dict(TINY, num_experts=1)),  # one expert: drop2's mask in the legacy (T, d, B) order
    "ffn": ("single", dict(TINY, use_moe=False, num_experts=1)),  # FeedForward: its own (T, B, F) dropout
    "plain": ("single", dict(TINY_PLAIN, dropout=0.1)),  # no time, 4 heads, nn.MultiheadAttention legacy side
    "dual": ("dual", {k: v for k, v in TINY_DUAL.items() if k != "use_mlp"}),  # gate stack, card subset
}


def _pair(name: str, **port_options):
    kind, kwargs = CONFIGS[name]
    config = S.ModelConfig(kwargs, name)
    pair = make_pair(case(f"{kind}:tiny"), config, init_seed=11, **port_options)
    L = kwargs["seq_len"]
    lengths = [min(n, L) for n in LENGTHS] if kind == "single" else [L, 3, 1, 0, L, 10]
    card = None if kind == "single" else [L, 1, 0, 1, 20, 1]  # several empty card histories
    batch = S.make_batch(config, kind, lengths, seed=3, time_scale=1e6, card_lengths=card)
    return pair, kind, batch


def _run(model, kind, batch, train: bool):
    """One forward (+ CrossEntropy(sum) backward in train mode) on the current global RNG state."""
    args, kwargs = model_inputs(batch.batch, kind)
    model.train(train)
    with torch.set_grad_enabled(train):
        scores, ensemble = model(*args, **kwargs)
        if train:
            F.cross_entropy(scores, batch.batch["y"], reduction="sum").backward()
    return scores.detach(), ensemble.detach()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_leaves_the_generator_where_the_legacy_leaves_it(name, train, monkeypatch):
    monkeypatch.setattr(stacks, "EXACT_TRAINING_IN_LEGACY_ORDER", False)  # lean in the exact path's training too
    pair, kind, batch = _pair(name)
    states, outs = {}, {}
    for side, model in (("legacy", pair.legacy), ("port", pair.port)):
        torch.manual_seed(5)
        first = _run(model, kind, batch, train)
        states[side] = torch.random.get_rng_state()
        second = _run(model, kind, batch, train)  # under the continuing state: the next draws line up too
        outs[side] = (*first, *second)
    assert torch.equal(states["port"], states["legacy"]), "the port consumed the generator differently"
    for got, want in zip(outs["port"], outs["legacy"]):
        torch.testing.assert_close(got, want, **OUTPUT_TOL)
    kw = CONFIGS[name][1]
    if train or (kw["use_moe"] and kw["num_experts"] > 1):  # draws that matter: the two forwards differ
        assert not torch.equal(outs["legacy"][0], outs["legacy"][2])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_equals_the_full_computation_outputs_gradients_and_draws(name, monkeypatch):
    pair, kind, batch = _pair(name)
    net = pair.port.network
    results = {}
    for lean in (False, True):
        monkeypatch.setattr(stacks, "EXACT_TRAINING_IN_LEGACY_ORDER", False)
        monkeypatch.setattr(stacks, "LEAN_LAST_LAYER", lean)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(21)
        scores, ensemble = _run(pair.port, kind, batch, train=True)
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results[lean] = (scores, ensemble, grads, torch.random.get_rng_state())
    full, lean = results[False], results[True]
    torch.testing.assert_close(lean[0], full[0], **SELF_TOL)
    torch.testing.assert_close(lean[1], full[1], **SELF_TOL)
    assert lean[2].keys() == full[2].keys()
    for n in full[2]:
        torch.testing.assert_close(lean[2][n], full[2][n], **GRAD_TOL, msg=lambda m, n=n: f"grad[{n}]: {m}")
    assert torch.equal(lean[3], full[3])


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_lean_under_activation_checkpointing_replays_the_same_step(activation_checkpointing, monkeypatch):
    """The lean last layer inside torch.utils.checkpoint: the replay draws the same full-shape masks."""
    monkeypatch.setattr(stacks, "EXACT_TRAINING_IN_LEGACY_ORDER", False)
    pair, kind, batch = _pair("moe1", activation_checkpointing=activation_checkpointing)
    torch.manual_seed(4)
    got = _run(pair.port, kind, batch, train=True)
    state = torch.random.get_rng_state()
    torch.manual_seed(4)
    want = _run(pair.legacy, kind, batch, train=True)
    assert torch.equal(state, torch.random.get_rng_state())
    torch.testing.assert_close(got[0], want[0], **OUTPUT_TOL)


def test_exact_training_runs_the_legacy_order_eval_and_fast_path_the_lean_feature_first_one():
    """The default: lean and feature first in eval (every path) and in the fast path's training; the exact path
    trains the full last layer and the rows-first aggregation (the legacy's rounding; stacks.rows_first)."""
    from lightning_port.nn.draws import set_legacy_rng

    pair, kind, batch = _pair("moe1")
    net = pair.port.network
    stack_layers = [m.layers for m in net.modules()
                    if isinstance(m, (stacks.OrderAttentionModule, stacks.FeatureAttentionModule))]
    assert stack_layers
    for training, legacy_rng, lean in ((False, True, True), (True, True, False), (True, False, True),
                                       (False, False, True)):
        net.train(training)
        set_legacy_rng(net, legacy_rng)
        for layers in stack_layers:
            assert stacks.lean_last_layer(layers) is lean, (training, legacy_rng)
            assert stacks.rows_first(layers) is not lean, (training, legacy_rng)  # the exact path's training only


def test_return_seq_gets_the_full_computation():
    pair, kind, batch = _pair("moe3")
    order = pair.port.network.order
    args, _ = model_inputs(batch.batch, kind)
    x_cat, x_num, _, time_seq = args[:4]
    kpm = key_padding_mask(batch.batch["not_padded"])
    order.eval()
    table = pair.port.network.embedding.weight
    with torch.no_grad():
        torch.manual_seed(2)
        seq = order(table, x_cat, x_num, time_seq, None, kpm, return_seq=True)
        torch.manual_seed(2)
        last = order(table, x_cat, x_num, time_seq, None, kpm)
    assert seq.shape == (len(LENGTHS), TINY["seq_len"] + 1, 2 * TINY["dim_embedding_table"])
    torch.testing.assert_close(seq[:, -1], last, **SELF_TOL)
