"""reference/ against the recorded legacy fixtures: every case, every recorded quantity, every file format.

Cases come from `parity.fixtures.all_cases()`: the shipped recordings plus any folders named by
TSA_LEGACY_FIXTURES, so held-out recordings are checked by the same code.
"""

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from parity.fixtures import all_cases, forward_args
from parity.tolerances import ADAM_REASON, KEY_BIAS_REASON, GradientNoiseRecorder, zero_gradient_key_biases
from reference import ASLSingleLabel, Cyclical_FocalLoss, FocalLoss, build_model
from reference.training import make_optimizer

CASES = all_cases()
IDS = [c.name for c in CASES]
SMALL = [c for c in CASES if not c.full_size]

OUT_TOL = {"atol": 1e-5, "rtol": 1e-4}  # issue 2: outputs no looser than atol 1e-5 / rtol 1e-4
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-3}  # issue 2: gradients rtol 1e-3


def legacy_model(case, weights=True):
    model = build_model(case.kind, seed=case.init_seed, **case.kwargs)
    if weights:
        model.load_state_dict(case.state_dict, strict=True)
    return model


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(actual, expected):
    assert list(actual) == list(expected)
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_seeded_init_reproduces_model_pt_exactly(case):
    model = build_model(case.kind, seed=case.init_seed, **case.kwargs)
    assert_same_state(model.state_dict(), case.state_dict)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_keys_and_shapes_match_legacy(case):
    model = build_model(case.kind, **case.kwargs)
    sd = model.state_dict()
    assert list(sd) == list(case.state_dict)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in case.state_dict.items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_legacy_file_format_loads_strictly(case):
    formats = {
        "model.pt": lambda obj: obj,
        "ddp_checkpoint.pt": lambda obj: {k.removeprefix("module."): v for k, v in obj.items()},
        "model_legacy_format.pt": lambda obj: obj,
    }
    seen = 0
    for name, unwrap in formats.items():
        if not case.has(name):
            continue
        raw = load(case.file(name))
        if name == "ddp_checkpoint.pt":
            assert all(k.startswith("module.") for k in raw)
        sd = unwrap(raw)
        legacy_model(case, weights=False).load_state_dict(sd, strict=True)
        assert_same_state(sd, case.state_dict)
        seen += 1
    if case.has("train_checkpoint.pt"):
        ckpt = load(case.file("train_checkpoint.pt"))
        assert set(ckpt) == {"model", "optimizer", "scheduler", "epoch", "best_auc"}
        legacy_model(case, weights=False).load_state_dict(ckpt["model"], strict=True)
        if case.trajectory is not None:
            assert_same_state(ckpt["model"], case.trajectory["final_state_dict"])
        seen += 1
    assert seen >= 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_outputs_seed7_and_seed8(case):
    model = legacy_model(case).eval()
    args, kwargs = forward_args(case.inputs, case.kind)
    with torch.no_grad():
        torch.manual_seed(7)
        scores7, ensemble7 = model(*args, **kwargs)
        torch.manual_seed(8)
        scores8, _ = model(*args, **kwargs)
    assert_close(scores7, case.expected["eval_seed7_scores"], **OUT_TOL)
    assert_close(ensemble7, case.expected["eval_seed7_ensemble"], **OUT_TOL)
    assert_close(scores8, case.expected["eval_seed8_scores"], **OUT_TOL)


def grad_summary(g):
    return torch.stack([g.norm(), g.sum(), g.abs().max()])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_seed9_scores_loss_and_every_gradient(case):
    model = legacy_model(case).train()
    args, kwargs = forward_args(case.inputs, case.kind)
    torch.manual_seed(9)
    scores, _ = model(*args, **kwargs)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")(scores, case.inputs["y"])
    loss.backward()
    assert_close(scores, case.expected["train_seed9_scores"], **OUT_TOL)
    assert_close(loss, case.expected["train_seed9_loss"], **OUT_TOL)
    params = dict(model.named_parameters())
    if "train_seed9_grads" in case.expected:
        expected = case.expected["train_seed9_grads"]
        assert set(expected) == set(params)
        for name, g in expected.items():
            p = params[name]
            if g is None:
                assert p.grad is None, f"{name}: legacy got no gradient"
            else:
                assert_close(p.grad, g, **GRAD_TOL, msg=lambda m, n=name: f"grad[{n}]: {m}")
    else:
        expected = case.expected["train_seed9_grad_summary"]
        assert set(expected) == set(params)
        for name, summary in expected.items():
            p = params[name]
            if summary is None:
                assert p.grad is None, f"{name}: legacy got no gradient"
                continue
            got = grad_summary(p.grad)
            # norm and abs-max: gradient tolerance. The sum of a gradient whose entries cancel is rounding noise;
            # its scale is the L1 norm (<= sqrt(numel) * L2 norm), so its absolute slack is measured against that.
            assert_close(got[[0, 2]], summary[[0, 2]], **GRAD_TOL, msg=lambda m, n=name: f"grad[{n}] norm/absmax: {m}")
            slack = GRAD_TOL["atol"] + 1e-6 * math.sqrt(p.numel()) * summary[0].item()
            assert abs(got[1].item() - summary[1].item()) <= slack + GRAD_TOL["rtol"] * abs(summary[1].item()), name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_recorded_loss(case):
    ex = case.expected
    scores, y = ex["eval_seed7_scores"], case.inputs["y"]
    assert_close(FocalLoss(alpha=0.25, gamma=2, reduction="mean")(scores, y), ex["loss_focal_mean"], **OUT_TOL)
    assert_close(FocalLoss(alpha=0.25, gamma=2, reduction="sum")(scores, y), ex["loss_focal_sum"], **OUT_TOL)
    cyc = Cyclical_FocalLoss(gamma_pos=0, gamma_neg=4, gamma_hc=0, epochs=10, factor=2, reduction="sum")
    for epoch in (0, 3, 9):
        assert_close(cyc(scores, y, epoch), ex[f"loss_cyclical_focal_sum_epoch{epoch}"], **OUT_TOL)
    assert_close(ASLSingleLabel(gamma_pos=0, gamma_neg=4)(scores, y), ex["loss_asl_single_label_mean"], **OUT_TOL)


def trajectory_batches(case):
    """The recorded protocol: the first half of the inputs, then the second half."""
    n = case.inputs["y"].shape[0]
    half = n // 2
    return [slice(0, half), slice(half, n)]


def six_recorded_steps(case):
    """The recorded protocol on the reference: Adam + OneCycleLR (stepped per epoch), 3 epochs of the two
    halves, ``torch.manual_seed(100 + step)`` right before each step's forward; (losses, lrs, final state,
    the rounding-level gradient elements)."""
    model = legacy_model(case)
    optimizer, scheduler = make_optimizer(model, lr=1e-5, scheduler_maxlr=1e-3, max_epoch=4)
    noise = GradientNoiseRecorder(model, optimizer)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    losses, lrs, step = [], [], 0
    model.train()
    for _epoch in range(3):
        for rows in trajectory_batches(case):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            args, kwargs = forward_args(case.inputs, case.kind, rows)
            torch.manual_seed(100 + step)
            scores, _ = model(*args, **kwargs)
            loss = loss_fn(scores, case.inputs["y"][rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        scheduler.step()
    return losses, lrs, model.state_dict(), noise


@pytest.mark.parametrize("case", [c for c in SMALL if c.trajectory is not None], ids=lambda c: c.name)
def test_six_step_trajectory(case):
    losses, lrs, final, noise = six_recorded_steps(case)
    traj = case.trajectory
    assert_close(torch.tensor(losses), torch.tensor(traj["loss"]), **OUT_TOL)
    assert lrs == pytest.approx(traj["lr"], rel=1e-12, abs=0)
    assert list(final) == list(traj["final_state_dict"])
    noisy = noise.state_masks()
    for k, v in traj["final_state_dict"].items():
        # ADAM_REASON: elements whose gradient was at rounding level in some step may differ by up to sum(lr);
        # every other element is held to the output tolerance.
        far = ~torch.isclose(final[k], v, **OUT_TOL)
        if far.any():
            unexplained = far & ~noisy.get(k, torch.zeros_like(far))
            assert not unexplained.any(), f"final weight {k}: {int(unexplained.sum())} elements differ ({ADAM_REASON})"
            assert (final[k] - v)[far].abs().max().item() <= sum(lrs) * (1 + 1e-3), f"final weight {k}"


# ---- why trained weights drift from a recording (issue 20, item 5; parity.tolerances.KEY_BIAS_REASON) -------------
def _thirds(g):
    e = g.shape[0] // 3
    return g[:e], g[e:2 * e], g[2 * e:]


@pytest.mark.parametrize("case", [c for c in SMALL if "train_seed9_grads" in c.expected], ids=lambda c: c.name)
def test_key_bias_gradient_is_rounding_noise_exactly_where_the_tolerance_says(case):
    """KEY_BIAS_REASON on the legacy's own recorded gradients (train seed 9): in every attention without the time
    factor (``zero_gradient_key_biases``) the key third of ``in_proj_bias`` got only rounding noise, <= 1e-5 of the
    query third's gradient (measured <= 2.5e-7); in the temporal attention a real gradient, >= 1e-3 of it
    (measured >= 5e-3). And the exact gradient is zero: the reference in float64 gives those key thirds <= 1e-12
    of the query gradient."""
    zero = zero_gradient_key_biases(legacy_model(case))
    recorded = {k: g for k, g in case.expected["train_seed9_grads"].items() if k.endswith("in_proj_bias")}
    assert recorded and zero <= set(recorded)
    for k, g in recorded.items():
        q, key, _ = (t.abs().max().item() for t in _thirds(g))
        if k in zero:
            assert key <= 1e-5 * q, f"{k}: recorded key-bias gradient {key:.3g}, query {q:.3g}"
        else:
            assert key >= 1e-3 * q, f"{k}: temporal key bias: recorded gradient {key:.3g}, query {q:.3g}"
    model = legacy_model(case).double().train()
    args, kwargs = forward_args(case.inputs, case.kind)
    args = tuple(a.double() if a is not None and a.is_floating_point() else a for a in args)
    torch.manual_seed(9)
    scores, _ = model(*args, **kwargs)
    torch.nn.CrossEntropyLoss(reduction="sum")(scores, case.inputs["y"]).backward()
    params = dict(model.named_parameters())
    for k in zero:
        q, key, _ = (t.abs().max().item() for t in _thirds(params[k].grad))
        assert key <= 1e-12 * q, f"{k}: float64 key-bias gradient {key:.3g}, query {q:.3g}"


def test_reference_training_reproduces_the_recorded_six_steps_bit_for_bit():
    """The reference's training loop is the legacy's, step for step: on the recording whose forward and gradients
    the reference reproduces bit for bit (single_plain: no MoE, no time factor), the six recorded steps come out
    bit for bit -- losses, learning rates and every final tensor, the zero-gradient key biases included, which
    any change of order (seeding, zero_grad, the scheduler's step, the batches) would move by Adam-normalised
    noise (KEY_BIAS_REASON). So a port's drift from a recording in those key biases is rounding amplified by Adam,
    not a training-order change in reference/. (On the MoE / time-factor recordings the reference's eval outputs
    already differ from the recorded ones by <= 1.2e-7, so their six steps agree to the tolerance of
    test_six_step_trajectory, not to the bit.)"""
    case = next(c for c in SMALL if c.name == "single_plain")
    model = legacy_model(case).eval()
    args, kwargs = forward_args(case.inputs, case.kind)
    with torch.no_grad():
        torch.manual_seed(7)
        assert torch.equal(model(*args, **kwargs)[0], case.expected["eval_seed7_scores"])  # the premise
    losses, lrs, final, _ = six_recorded_steps(case)
    traj = case.trajectory
    assert losses == [float(v) for v in traj["loss"]]
    assert lrs == [float(v) for v in traj["lr"]]
    assert zero_gradient_key_biases(legacy_model(case))  # the key biases the claim is about are there
    assert_same_state(final, traj["final_state_dict"])
    assert "key third of in_proj_bias" in KEY_BIAS_REASON and KEY_BIAS_REASON in ADAM_REASON


@pytest.mark.parametrize("case", [c for c in CASES if c.has("train_checkpoint.pt")], ids=lambda c: c.name)
def test_train_checkpoint_optimizer_and_scheduler_restore(case):
    """The legacy training checkpoint restores into the legacy optimiser/scheduler factory."""
    ckpt = load(case.file("train_checkpoint.pt"))
    model = legacy_model(case, weights=False)
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer, scheduler = make_optimizer(model, lr=1e-5, scheduler_maxlr=1e-3, max_epoch=ckpt["scheduler"]["total_steps"])
    optimizer.load_state_dict(copy.deepcopy(ckpt["optimizer"]))
    scheduler.load_state_dict(ckpt["scheduler"])
    assert scheduler.last_epoch == ckpt["scheduler"]["last_epoch"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(ckpt["optimizer"]["param_groups"][0]["lr"])
    assert len(optimizer.state) == len(ckpt["optimizer"]["state"])
