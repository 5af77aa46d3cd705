"""The `precision` category: the legacy model (``reference/``) and the port under the same ``torch.autocast``.

Variants (:data:`VARIANTS`): ``cpu-bf16`` and ``cpu-fp16`` always; ``cuda-bf16`` and ``cuda-fp16`` when
``torch.cuda.is_available()`` (otherwise their records say "not covered: no GPU", status ``skipped``: never
passed). ``fp16`` is the legacy AMP dtype (``use_amp`` 1 ran ``torch.cuda.amp`` = float16 + GradScaler);
``bf16`` is what Lightning's ``bf16-mixed`` and CPU autocast use.

Checks, each side on the same weights, inputs and seed (dropout masks and MoE coin flips are drawn from the
same generator state; on CPU a dropout mask does not depend on the tensor's dtype):

- ``precision.forward``: eval outputs (scores, ensemble), port vs legacy under the same autocast.
- ``precision.train_outputs``: train-mode scores and CrossEntropy(sum) loss, dropout on, same seed.
- ``precision.gradient``: the whole gradient (every parameter, mapped to legacy names) of that loss, port vs
  legacy under the same autocast, against the a-priori backward bound plus twice the legacy's own measured
  autocast error of the same gradient (:data:`GRADIENT_REASON`: gradients that are cancelling sums are not
  well conditioned). float16 backward runs on a scaled loss like the legacy GradScaler (scale 2^16, halved
  until both sides are finite, then unscaled).
- ``precision.legacy_control``: the legacy model's eval and train outputs under autocast vs the legacy model in
  float32 (same seed), held to the one-sided bound. It shows that the bound describes what autocast rounding
  does to the legacy function itself (it is not fitted to the port); a failure here means the bound is wrong.
- ``precision.training``: a few optimizer steps of the legacy loop with AMP
  (``reference.training.train_one_epoch(..., scaler=GradScaler, amp_dtype=...)``) vs ``Trainer.fit`` with
  Lightning's precision plugin (``bf16-mixed``; ``16-mixed`` with its GradScaler, on CPU through
  :func:`lightning_port.trainer.mixed_precision_plugin`): per-step losses, learning rates, the loss scale
  before every step and the steps the scaler skipped (exact), final weights (Adam bound).
- ``precision.resume``: a legacy AMP job (``use_amp`` 1) trained one epoch with its GradScaler, saved as the
  legacy training checkpoint (which holds no scaler state, legacy-tsa §14), converted with ``tsa-convert``
  and resumed with ``Trainer.fit(ckpt_path=...)`` in ``16-mixed``, vs the legacy loop resumed the same way
  (a fresh GradScaler at its initial scale).

How the comparison works (the tolerances and their derivation: :mod:`parity.tolerances`,
:func:`~parity.tolerances.amp_bounds`): errors are normwise, in units of the float32 legacy output's scale
(``|port - legacy| / max|legacy fp32|`` per tensor; the gradient as one vector, ``||Δg||₂ / ||g||₂``), and
the bound is a probabilistic rounding-error bound ``λ·sqrt(roundings)·u`` from the dtype's unit roundoff u
and the depth of the computation. The report's ``max_abs_err`` of these checks is that normalised error, and
``atol`` the bound.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from reference.training import model_inputs

from ..cases import ParityCase
from ..compare import Comparison, Mismatch, compare
from ..pairs import dropped_keys, make_pair, port_grads_as_legacy
from ..report import CheckRecord, skipped
from ..rng import seeded
from ..tolerances import (
    DERIVED_REASON,
    EXACT,
    FINAL_REASON,
    GRADIENT_REASON,
    SCHEDULE_REASON,
    AmpBounds,
    Tolerance,
    amp_bounds,
)
from .base import RunContext, _init_seed, run_property

FP16_INIT_SCALE = 2.0**16  # torch.amp.GradScaler's init_scale (the legacy scaler's)


@dataclass(frozen=True)
class AmpVariant:
    device: str  # "cpu" | "cuda"
    dtype: torch.dtype

    @property
    def short(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp16"

    @property
    def name(self) -> str:
        return f"{self.device}-{self.short}"

    @property
    def plugin(self) -> str:
        """Lightning's precision flag for this dtype."""
        return "bf16-mixed" if self.dtype == torch.bfloat16 else "16-mixed"

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def available(self) -> bool:
        return self.device == "cpu" or torch.cuda.is_available()


VARIANTS = (AmpVariant("cpu", torch.bfloat16), AmpVariant("cpu", torch.float16),
            AmpVariant("cuda", torch.bfloat16), AmpVariant("cuda", torch.float16))
FORWARD_CASES = ("single:tiny", "single:tiny-plain", "single:drawn", "dual:tiny", "dual:drawn")
TRAINING_CASES = ("single:tiny", "dual:tiny")
RESUME_CASE = "single:tiny"
FORWARD_CHECKS = ("precision.forward", "precision.train_outputs", "precision.gradient", "precision.legacy_control")
NOT_ON_GPU = "not covered: no GPU (torch.cuda.is_available() is False); runs when a CUDA device is present"


def variant(name: str) -> AmpVariant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no precision variant {name!r}; known: {[v.name for v in VARIANTS]}")


# ------------------------------------------------------------------------------------------- helpers
def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _scale_of(t: torch.Tensor) -> float:
    m = float(t.detach().double().abs().max()) if t.numel() else 0.0
    return m if m > 0 and math.isfinite(m) else 1.0


def normwise(actual: dict, expected: dict, reference: dict, bound: float, path: str, context: dict,
             reason: str) -> Comparison:
    """``|actual - expected| / max|reference|`` per tensor against ``bound`` (normwise relative error in units
    of the float32 legacy output's scale; NaN/inf handled by :func:`parity.compare.compare`)."""
    tol = Tolerance(0.0, bound, reason)
    out = Comparison(tolerance=tol, context=dict(context))
    for k, e in expected.items():
        s = _scale_of(reference[k])
        out.merge(compare(actual[k].double() / s, e.double() / s, tol, path=f"{path}[{k}]", context=context))
    out.context = dict(context)
    return out


def _l2(d: dict, keys) -> float:
    return math.sqrt(sum(float(d[k].double().pow(2).sum()) for k in keys))


def gradient_comparison(port: dict, legacy: dict, base: dict, bound: float, context: dict) -> Comparison:
    """The whole gradient as one vector (every parameter, legacy names): ``||g_port - g_legacy||₂`` against
    ``bound·||g_fp32||₂ + 2·||g_legacy - g_fp32||₂`` (see :data:`GRADIENT_REASON`); the comparison's error is
    the ratio of the two (pass: <= 1). A failure names the parameters that contribute most, and any
    non-finite ones."""
    tol = Tolerance(0.0, 1.0, GRADIENT_REASON)
    keys = [k for k in legacy if legacy[k].numel()]
    g_norm = _l2(base, keys) or 1.0
    diff = {k: float((port[k].double() - legacy[k].double()).pow(2).sum()) for k in keys}
    own = _l2({k: legacy[k].double() - base[k].double() for k in keys}, keys)
    nonfinite = [k for k in keys if not (torch.isfinite(port[k]).all() and torch.isfinite(legacy[k]).all())]
    err = math.sqrt(sum(v for v in diff.values() if math.isfinite(v)))
    limit = bound * g_norm + 2 * own
    ratio = math.inf if nonfinite else (err / limit if limit > 0 else (0.0 if err == 0 else math.inf))
    ctx = dict(context, grad_rel_err=err / g_norm, legacy_own_amp_rel_err=own / g_norm, grad_bound=bound)
    out = Comparison(tolerance=tol, context=ctx, leaves=1, max_abs_err=ratio, max_rel_err=err / g_norm,
                     worst_path="grad (whole gradient, L2; error / allowed)")
    if ratio > 1.0:
        top = sorted(((v, k) for k, v in diff.items() if math.isfinite(v)), reverse=True)[:3]
        detail = (f"||Δg||/||g|| = {err / g_norm:.3g}, allowed {bound:.3g} + 2 x {own / g_norm:.3g} (the legacy's own "
                  "autocast error); largest contributions: "
                  + ", ".join(f"grad[{k}] {math.sqrt(v) / g_norm:.3g}" for v, k in top))
        if nonfinite:
            detail += f"; non-finite gradients in {nonfinite[:5]}"
        out.mismatches.append(Mismatch("grad (whole gradient, L2)", "values", bad=1, numel=1, max_abs_err=ratio,
                                       abs_index=(), max_rel_err=err / g_norm, rel_index=(), detail=detail))
    return out


def _eval(model, batch: dict, kind: str, seed: int, amp: AmpVariant | None) -> dict:
    args, kwargs = model_inputs(batch, kind)
    model.eval()
    with torch.no_grad(), seeded(seed), torch.autocast(amp.device if amp else "cpu",
                                                       dtype=amp.dtype if amp else None, enabled=amp is not None):
        scores, ensemble = model(*args, **kwargs)
    return {"scores": scores.float(), "ensemble": ensemble.float()}


def _train(model, params: dict, batch: dict, kind: str, seed: int, amp: AmpVariant | None, scale: float):
    """Train-mode forward under ``seed`` (and autocast), CrossEntropy(sum), backward of ``loss * scale``;
    returns outputs, unscaled gradients by name (zeros where None) and whether they are all finite."""
    args, kwargs = model_inputs(batch, kind)
    model.train()
    for p in params.values():
        p.grad = None
    with seeded(seed):
        with torch.autocast(amp.device if amp else "cpu", dtype=amp.dtype if amp else None, enabled=amp is not None):
            scores, _ = model(*args, **kwargs)
            loss = F.cross_entropy(scores, batch["y"], reduction="sum")  # autocast runs it in float32
        (loss * scale).backward()
    grads = {n: (p.grad.float() / scale if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
             for n, p in params.items()}
    finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
    return {"scores": scores.detach().float(), "loss": loss.detach().float()}, grads, finite


def _amp_gradients(pair, batch, kind, seed, amp: AmpVariant, lparams, pparams):
    """Both sides' autocast gradients at the same loss scale: 2^16 halved until both are finite for float16
    (GradScaler's init scale and backoff), 1 for bfloat16 (Lightning's bf16-mixed has no scaler)."""
    scale = FP16_INIT_SCALE if amp.scaled else 1.0
    while True:
        out_l, g_l, fin_l = _train(pair.legacy, lparams, batch, kind, seed, amp, scale)
        out_p, g_p, fin_p = _train(pair.port, pparams, batch, kind, seed, amp, scale)
        if (fin_l and fin_p) or scale <= 1.0:
            return out_l, g_l, out_p, g_p, scale
        scale /= 2.0


# ------------------------------------------------------------------------------ forward and gradients
def check_precision(case: ParityCase, amp: AmpVariant, ctx: RunContext) -> list[CheckRecord]:
    """Eval outputs, train outputs and the whole gradient, port vs legacy under the same autocast, and the
    legacy's own autocast error (control), for one case and one variant."""
    model = f"{case.model}@{amp.name}"
    rec = {n: CheckRecord.new(n, "precision", model, Tolerance(0.0, math.nan, DERIVED_REASON))
           for n in FORWARD_CHECKS}
    rec["precision.gradient"] = CheckRecord.new("precision.gradient", "precision", model,
                                                Tolerance(0.0, 1.0, GRADIENT_REASON))
    ratios: list[float] = []
    worst_share = dict.fromkeys(FORWARD_CHECKS, 0.0)  # worst error / that example's own bound

    def body(data):
        config = data.draw(case.configs(), label="config")
        seed = data.draw(_init_seed(case), label="init_seed")
        pair = make_pair(case, config, seed, mutate=ctx.mutate)
        b = data.draw(case.inputs(config), label="batch")
        fseed = data.draw(st.integers(0, 2**16), label="forward_seed")
        tseed = data.draw(st.integers(0, 2**16), label="train_seed")
        bounds = amp_bounds(config.kwargs, case.kind, amp.dtype)
        pair.legacy.to(amp.device)
        pair.port.to(amp.device)
        batch = _to(b.batch, amp.device)
        context = pair.context(variant=amp.name, forward_seed=fseed, train_seed=tseed, batch=b.recipe,
                               depth=bounds.depth)
        lparams = dict(pair.legacy.named_parameters())
        pparams = dict(pair.port.network.named_parameters())
        drop = set(dropped_keys(pair.port, case.kind))

        base_eval = _eval(pair.legacy, batch, case.kind, fseed, None)
        ref_eval = _eval(pair.legacy, batch, case.kind, fseed, amp)
        port_eval = _eval(pair.port, batch, case.kind, fseed, amp)
        base_out, base_g, _ = _train(pair.legacy, lparams, batch, case.kind, tseed, None, 1.0)
        out_l, g_l, out_p, g_p, scale = _amp_gradients(pair, batch, case.kind, tseed, amp, lparams, pparams)
        context["loss_scale"] = scale

        def legacy_named(g):
            return {k: v for k, v in g.items() if k not in drop}

        g_p_legacy = legacy_named(port_grads_as_legacy(pair, g_p))
        g_l, base_g = legacy_named(g_l), legacy_named(base_g)
        two, one = bounds.forward_two_sided, bounds.forward_one_sided
        comps = {
            "precision.forward": normwise(port_eval, ref_eval, base_eval, two, "eval", context, bounds.reason),
            "precision.train_outputs": normwise(out_p, out_l, base_out, two, "train", context, bounds.reason),
            "precision.gradient": gradient_comparison(g_p_legacy, g_l, base_g, bounds.gradient_two_sided, context),
            "precision.legacy_control": normwise(ref_eval, base_eval, base_eval, one, "eval", context,
                                                 bounds.reason).merge(
                normwise(out_l, base_out, base_out, one, "train", context, bounds.reason)),
        }
        for name, bound in (("precision.forward", two), ("precision.train_outputs", two),
                            ("precision.legacy_control", one), ("precision.gradient", 1.0)):
            r = rec[name]
            r.atol = bound if math.isnan(r.atol) else max(r.atol, bound)
            if name != "precision.gradient":
                r.tolerance_reason = bounds.reason_template
            worst_share[name] = max(worst_share[name], comps[name].max_abs_err / bound)
        # accuracy: the port's autocast error vs the legacy's, both against the float32 legacy (a finding)
        e_port = max(float((port_eval[k] - base_eval[k]).abs().max()) / _scale_of(base_eval[k]) for k in base_eval)
        e_ref = max(float((ref_eval[k] - base_eval[k]).abs().max()) / _scale_of(base_eval[k]) for k in base_eval)
        if e_ref > 0:
            ratios.append(e_port / e_ref)
        pair.legacy.to("cpu")
        pair.port.to("cpu")
        return comps

    out = run_property(rec, ctx, case, 0.2, body)
    for name, share in worst_share.items():
        rec[name].notes = f"worst error / the bound of its own example: {share:.3f}"
    if ratios:
        ratios.sort()
        rec["precision.forward"].notes += (
            f"; accuracy vs the float32 legacy, eval outputs: port error / legacy error under {amp.name} autocast: "
            f"median {ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f} over {len(ratios)} examples")
    return out


# ----------------------------------------------------------------------------------------- training
class _StepLog:
    """Per step: the loss scale in force and whether the optimizer stepped (GradScaler skips non-finite)."""

    def __init__(self) -> None:
        self.steps: list[int] = []  # the global step index of every batch
        self.scales: list[float] = []  # the loss scale in force at its start (1.0 without a scaler)
        self.stepped: list[int] = []  # the steps whose optimizer.step ran (GradScaler found finite gradients)

    def taken_lrs(self, lrs: list[float]) -> list[float]:
        done = set(self.stepped)
        return [lr for step, lr in zip(self.steps, lrs) if step in done]


def _legacy_amp_run(legacy, batches, kind, amp: AmpVariant, epochs: int, lr, maxlr, total, start_epoch=0,
                    step_offset=0, optimizer_state=None, scheduler_state=None):
    """The legacy loop with AMP (``reference.training``), reseeding ``100 + step`` before each step."""
    from reference.training import make_optimizer, set_loss, train_one_epoch

    from ..rng import reseed_for_step
    from ..tolerances import GradientNoiseRecorder

    optimizer, scheduler = make_optimizer(legacy, lr=lr, scheduler_maxlr=maxlr, max_epoch=total)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    noise = GradientNoiseRecorder(legacy, optimizer)
    scaler = torch.amp.GradScaler(amp.device, enabled=amp.scaled)  # legacy: a fresh scaler for every run
    log = _StepLog()
    current = {"step": None}
    optimizer.register_step_pre_hook(lambda *a, **k: log.stepped.append(current["step"]))
    losses, lrs = [], []

    def before(step):
        current["step"] = step
        log.steps.append(step)
        lrs.append(optimizer.param_groups[0]["lr"])
        log.scales.append(float(scaler.get_scale()) if amp.scaled else 1.0)
        reseed_for_step(step)

    loss_fn = set_loss("CrossEntropyLoss")
    for epoch in range(start_epoch, start_epoch + epochs):
        losses += train_one_epoch(legacy, batches, optimizer, loss_fn, epoch, kind, scaler=scaler, before_step=before,
                                  step_offset=step_offset + (epoch - start_epoch) * len(batches),
                                  amp_dtype=amp.dtype)
        scheduler.step()
    return losses, lrs, log, noise, optimizer, scheduler


def _port_amp_run(port, batches, amp: AmpVariant, max_epochs: int, ckpt_path: str | None = None):
    """``Trainer.fit`` with the precision plugin the ``tsa`` trainer uses for ``amp.plugin``."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_port.trainer import mixed_precision_plugin

    from ..rng import ReseedPerStep
    from ..tolerances import GradientNoiseRecorder

    log = _StepLog()
    rec = {"noise": None}

    class _Log(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            rec["noise"] = GradientNoiseRecorder(pl_module.network, opt)
            opt.register_step_pre_hook(lambda *a, **k: log.stepped.append(trainer.global_step))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            log.steps.append(trainer.global_step)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            log.scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)

    cb = ReseedPerStep()
    plugin = mixed_precision_plugin(amp.plugin, amp.device)
    kw = {"plugins": [plugin]} if plugin is not None else {"precision": amp.plugin}
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator=amp.device, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb, _Log()], **kw)
    trainer.fit(port, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False), ckpt_path=ckpt_path)
    return cb.losses, cb.lrs, log, rec["noise"], trainer


def adam_drift_bound(lrs: list[float], betas=(0.9, 0.999)) -> float:
    """The most two Adam runs with these per-step learning rates can move one weight apart: each step moves a
    weight by at most ``lr·c_t`` with ``c_t = sqrt(Σ_i w_i² / v_i)`` (Cauchy–Schwarz on the bias-corrected
    moments; c_1 = 1), in either direction."""
    b1, b2 = betas
    total = 0.0
    for t, lr in enumerate(lrs, start=1):
        w = [(1 - b1) * b1 ** (t - i) / (1 - b1**t) for i in range(1, t + 1)]
        v = [(1 - b2) * b2 ** (t - i) / (1 - b2**t) for i in range(1, t + 1)]
        total += 2 * lr * math.sqrt(sum(wi * wi / vi for wi, vi in zip(w, v)))
    return total


def final_weights_comparison(actual: dict, expected: dict, stepped_lrs: list[float], context: dict) -> Comparison:
    """Final weights after AMP Adam steps: every element within :func:`adam_drift_bound` (autocast gradients
    differ by rounding in nearly every element, and Adam's sign-like first steps turn a rounding-level
    gradient difference into up to 2·lr)."""
    bound = adam_drift_bound(stepped_lrs)
    tol = Tolerance(0.0, bound * (1 + 1e-6), FINAL_REASON)
    return compare(actual, expected, tol, path="final", context=context)


TRAINING_CHECKS = ("precision.training.losses", "precision.training.schedule", "precision.training.final_weights")



def _training_records(model: str, bounds_reason: str) -> dict[str, CheckRecord]:
    return {"precision.training.losses": CheckRecord.new("precision.training.losses", "precision", model,
                                                         Tolerance(0.0, math.nan, bounds_reason)),
            "precision.training.schedule": CheckRecord.new("precision.training.schedule", "precision", model,
                                                           Tolerance(0.0, 0.0, SCHEDULE_REASON)),
            "precision.training.final_weights": CheckRecord.new("precision.training.final_weights", "precision",
                                                                model, Tolerance(0.0, math.nan, FINAL_REASON))}


def _training_comps(p_loss, p_lrs, p_log, l_loss, l_lrs, l_log, p_final, l_final, bounds: AmpBounds, context,
                    records: dict[str, CheckRecord]) -> dict[str, Comparison]:
    """Per-step losses (normwise, the two-sided forward bound), the schedule (learning rates, loss scales, global
    steps and the steps the scaler let through: exact) and the final weights (Adam drift bound)."""
    drift = adam_drift_bound(l_log.taken_lrs(l_lrs)) * (1 + 1e-6)
    for name, bound in (("precision.training.losses", bounds.forward_two_sided),
                        ("precision.training.final_weights", drift)):
        r = records[name]
        r.atol = bound if math.isnan(r.atol) else max(r.atol, bound)
    return {
        "precision.training.losses": normwise({"loss": torch.tensor(p_loss)}, {"loss": torch.tensor(l_loss)},
                                              {"loss": torch.tensor(l_loss)}, bounds.forward_two_sided, "losses",
                                              context, bounds.reason),
        "precision.training.schedule": compare(
            {"lr": p_lrs, "loss_scale": p_log.scales, "steps": p_log.steps, "stepped": p_log.stepped},
            {"lr": l_lrs, "loss_scale": l_log.scales, "steps": l_log.steps, "stepped": l_log.stepped},
            EXACT, path="schedule", context=context),
        "precision.training.final_weights": compare(p_final, l_final, Tolerance(0.0, drift, FINAL_REASON),
                                                    path="final", context=context),
    }


def check_precision_training(case: ParityCase, amp: AmpVariant, ctx: RunContext) -> list[CheckRecord]:
    """Six steps (3 epochs x 2 batches, the training category's protocol) of the legacy AMP loop vs
    ``Trainer.fit`` with the precision plugin, same weights, data and per-step seeds."""
    from ..tolerances import AMP_REASON
    from .training import TRAIN_EPOCHS, TRAIN_LR, TRAIN_MAXLR, TRAIN_TOTAL_EPOCHS, _port_final_as_legacy

    model = f"{case.model}@{amp.name}:{amp.plugin}"
    rec = _training_records(model, "losses: " + AMP_REASON)

    def body(data):
        config = data.draw(case.configs(), label="config")
        seed = data.draw(_init_seed(case), label="init_seed")
        pair = make_pair(case, config, seed, mutate=ctx.mutate, lr=TRAIN_LR, scheduler_maxlr=TRAIN_MAXLR,
                         max_epochs=TRAIN_TOTAL_EPOCHS)
        b = data.draw(case.inputs(config), label="batch")
        bounds = amp_bounds(config.kwargs, case.kind, amp.dtype)
        half = max(b.size // 2, 1)
        batches = [b.rows(slice(0, half)).batch, b.rows(slice(half, None)).batch if b.size > 1 else b.batch]
        batches = [_to(x, amp.device) for x in batches]
        pair.legacy.to(amp.device)
        pair.port.to(amp.device)
        l_loss, l_lrs, l_log, _, _, _ = _legacy_amp_run(pair.legacy, batches, case.kind, amp, TRAIN_EPOCHS,
                                                        TRAIN_LR, TRAIN_MAXLR, TRAIN_TOTAL_EPOCHS)
        p_loss, p_lrs, p_log, _, _ = _port_amp_run(pair.port, batches, amp, TRAIN_EPOCHS)
        context = pair.context(variant=amp.name, plugin=amp.plugin, batch=b.recipe, depth=bounds.depth)
        p_final, drop = _port_final_as_legacy(pair.port, case.kind, {k: v.cpu() for k, v in
                                                                     pair.port.network.state_dict().items()})
        l_final = {k: v.cpu() for k, v in pair.legacy.state_dict().items() if k not in drop}
        comps = _training_comps(p_loss, p_lrs, p_log, l_loss, l_lrs, l_log, p_final, l_final, bounds, context, rec)
        pair.legacy.to("cpu")
        pair.port.to("cpu")
        return comps

    return run_property(rec, ctx, case, 0.05, body)


# ------------------------------------------------------------------------------------------ resume
def legacy_amp_job(case: ParityCase, config, seed: int, batches: list[dict], amp: AmpVariant, epochs: int = 1,
                   lr: float = 1e-5, maxlr: float = 1e-3, total: int = 4):
    """A legacy ``use_amp`` 1 job: ``epochs`` epochs of the legacy loop with its GradScaler, then the legacy
    training checkpoint ``{model, optimizer, scheduler, epoch, best_auc}`` (no scaler state, legacy-tsa §14)."""
    legacy = case.build_reference(config, seed=seed)
    from ..pairs import perturb_

    perturb_(legacy, seed + 1)
    legacy.to(amp.device)
    _, _, log, _, opt, sched = _legacy_amp_run(legacy, batches, case.kind, amp, epochs, lr, maxlr, total)
    state = {"model": {k: v.cpu() for k, v in legacy.state_dict().items()}, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "epoch": epochs - 1, "best_auc": 0.5}
    return state, log


def resume_amp_job(case: ParityCase, config, job: dict, batches: list[dict], amp: AmpVariant, tmp: Path,
                   lr: float = 1e-5, maxlr: float = 1e-3):
    """Convert the legacy AMP job with ``tsa-convert``'s core and resume it one epoch in Lightning with the
    precision plugin, and resume the legacy loop the legacy way (fresh GradScaler); returns both runs."""
    from lightning_port.convert import legacy_to_lightning, module_class, split_legacy
    from lightning_port.weight_map import dropped_legacy_keys, port_to_legacy
    from reference import build_model

    hparams = {"modelname": "OrderFeature" if case.kind == "single" else "TwoSeqMoEOrderFeature",
               **config.kwargs, "lr": lr, "scheduler_maxlr": maxlr, "max_epoch": job["scheduler"]["total_steps"],
               "use_amp": 1}
    legacy_sd, training, _ = split_legacy(job, "legacy AMP job")
    ckpt, _ = legacy_to_lightning(legacy_sd, hparams, training, source="legacy AMP job")
    path = tmp / "converted.ckpt"
    torch.save(ckpt, path)
    epochs_done, steps_done = int(ckpt["epoch"]), int(ckpt["global_step"])

    legacy = build_model(case.kind, **config.kwargs)
    legacy.load_state_dict(legacy_sd, strict=True)
    legacy.to(amp.device)
    l_loss, l_lrs, l_log, _, _, _ = _legacy_amp_run(
        legacy, batches, case.kind, amp, 1, lr, maxlr, job["scheduler"]["total_steps"], start_epoch=epochs_done,
        step_offset=steps_done, optimizer_state=job["optimizer"], scheduler_state=job["scheduler"])
    module = module_class(case.kind).load_from_checkpoint(str(path), map_location=amp.device)
    p_loss, p_lrs, p_log, _, trainer = _port_amp_run(module, batches, amp, epochs_done + 1, ckpt_path=str(path))
    drop = set(dropped_legacy_keys(module.config, case.kind))
    p_final = {k: v.cpu() for k, v in port_to_legacy(module.network.state_dict(), module.config, case.kind).items()
               if k not in drop}
    l_final = {k: v.cpu() for k, v in legacy.state_dict().items() if k not in drop}
    return {"port": (p_loss, p_lrs, p_log, p_final), "legacy": (l_loss, l_lrs, l_log, l_final), "ckpt": ckpt,
            "trainer": trainer}


def check_precision_resume(amp: AmpVariant, ctx: RunContext) -> list[CheckRecord]:
    """A legacy AMP job converted and resumed in ``16-mixed`` vs the legacy loop resumed (fixed example)."""
    from ..cases import case as get_case
    from ..strategies import make_batch
    from ..tolerances import AMP_REASON

    c = get_case(RESUME_CASE)
    model = f"{c.model}@{amp.name}:{amp.plugin} resumed legacy AMP job"
    config = c.configs().example()
    bounds = amp_bounds(config.kwargs, c.kind, amp.dtype)
    recs = _training_records(model, "losses: " + AMP_REASON)
    recs["precision.training.schedule"].notes = (
        "legacy use_amp job (1 epoch, GradScaler) -> legacy training checkpoint (no scaler state) -> tsa-convert -> "
        "Trainer.fit(ckpt_path) in 16-mixed (fresh scaler) vs the legacy loop resumed with a fresh GradScaler, one "
        "more epoch")
    try:
        full = make_batch(config, c.kind, [config.seq_len, 3, 0, 5, 1, config.seq_len], seed=11)
        batches = [_to(full.rows(slice(0, 3)).batch, amp.device), _to(full.rows(slice(3, 6)).batch, amp.device)]
        job, _ = legacy_amp_job(c, config, 1234, batches, amp)
        with tempfile.TemporaryDirectory() as tmp:
            runs = resume_amp_job(c, config, job, batches, amp, Path(tmp))
        p_loss, p_lrs, p_log, p_final = runs["port"]
        l_loss, l_lrs, l_log, l_final = runs["legacy"]
        context = {"model": c.model, "variant": amp.name, "plugin": amp.plugin, "config": config.kwargs}
        for name, comp in _training_comps(p_loss, p_lrs, p_log, l_loss, l_lrs, l_log, p_final, l_final, bounds,
                                          context, recs).items():
            recs[name].add(comp)
    except Exception as e:  # a crash is a failed check, with its traceback
        import traceback

        for r in recs.values():
            r.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return list(recs.values())


def check_not_on_this_machine(amp: AmpVariant, ctx: RunContext) -> list[CheckRecord]:
    """The checks of a variant whose device is absent: one ``skipped`` record each, never passed."""
    cases = ", ".join(FORWARD_CASES)
    out = [skipped(n, "precision", f"{cases} @{amp.name}", NOT_ON_GPU)
           for n in FORWARD_CHECKS]
    out += [skipped(n, "precision", f"{', '.join(TRAINING_CASES)} @{amp.name}:{amp.plugin}", NOT_ON_GPU)
            for n in TRAINING_CHECKS]
    return out


# ------------------------------------------------------------------------------------------ short fits
FIT_CHECKS = ("precision.fit_auroc", "precision.fit_auroc_fast_path")


def check_precision_fit(kind: str, ctx: RunContext) -> list[CheckRecord]:
    """A short ``bf16-mixed`` fit (every seed of the fast_path category's protocol, on the CPU) reaches the fp32
    fit's validation AUROC: each bf16 seed's AUROC within the fp32 seeds' range widened by their spread, and the
    mean within the spread of the fp32 mean. Two records, each path against itself in fp32 (same seeds, so the
    same dropout masks and coins: only the precision differs): the exact path, and the fast path (what issue 21
    offers for speed)."""
    import statistics

    from ..tolerances import BF16_FIT_TOL
    from .fast_path import SHORT_FIT_NOTE, TRAIN_SEEDS, short_fits

    model = f"{kind}:synth@cpu-bf16:bf16-mixed"
    rec = {n: CheckRecord.new(n, "precision", model, BF16_FIT_TOL, notes=SHORT_FIT_NOTE) for n in FIT_CHECKS}
    try:
        for name, path in zip(FIT_CHECKS, ("exact", "fast")):
            fp32 = [r[1] for r in short_fits(kind, path, ctx)]
            lo, hi, spread = min(fp32), max(fp32), max(fp32) - min(fp32)
            bf16 = [r[1] for r in short_fits(kind, path, ctx, precision="bf16-mixed")]
            diff = abs(statistics.mean(bf16) - statistics.mean(fp32))
            r = rec[name]
            r.add_value(diff, diff / spread if spread > 0 else math.inf)
            r.notes += (f"; {path} path, AUROC in bf16-mixed {[round(v, 4) for v in bf16]} vs in fp32 "
                        f"{[round(v, 4) for v in fp32]} (spread {spread:.4f}), |mean difference| {diff:.4f}")
            outside = [(s, v) for s, v in zip(TRAIN_SEEDS, bf16) if not lo - spread <= v <= hi + spread]
            if outside:
                r.fail(f"{name}: bf16 AUROC outside the fp32 range [{lo:.4f}, {hi:.4f}] widened by its spread "
                       f"{spread:.4f}: " + ", ".join(f"seed {s}: {v:.4f}" for s, v in outside))
            if not diff <= spread:
                r.fail(f"{name}: bf16 mean AUROC {statistics.mean(bf16):.4f} vs fp32 mean {statistics.mean(fp32):.4f} "
                       f"(fp32 seed-to-seed spread {spread:.4f})")
    except Exception as e:  # a crash is a failed check, with its traceback
        import traceback

        for r in rec.values():
            r.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return list(rec.values())
