"""The `training` category: N optimizer steps of the legacy loop vs `Trainer.fit` on the port, and the
Adam-aware final-weight comparison other categories reuse."""

from __future__ import annotations

import torch

from ..cases import ParityCase
from ..compare import Comparison, compare
from ..pairs import make_pair
from ..report import CheckRecord
from .base import RunContext, _init_seed, run_property

TRAIN_LR, TRAIN_MAXLR, TRAIN_TOTAL_EPOCHS, TRAIN_EPOCHS = 1e-5, 1e-3, 4, 3  # the recorded trajectory protocol


def adam_weights_comparison(actual: dict, expected: dict, lrs: list[float], tol, context: dict,
                            noisy: dict | None = None, key_biases: frozenset[str] = frozenset()) -> Comparison:
    """Final weights after Adam steps under the policy in ``tolerances.ADAM_REASON``; ``noisy`` maps
    legacy keys to the elements whose legacy gradient was at rounding level in some step; the key third of
    the ``in_proj_bias`` keys in ``key_biases`` (``tolerances.zero_gradient_key_biases`` of the legacy model)
    is held to the Adam step bound only (``tolerances.KEY_BIAS_REASON``)."""
    from ..compare import Mismatch

    noisy = noisy or {}

    out = Comparison(tolerance=tol, context=context)
    bound = sum(lrs) * (1 + 1e-3)
    for k, e in expected.items():
        if k not in actual:
            out.mismatches.append(Mismatch(f"final[{k}]", "missing", detail="not in the port's state"))
            continue
        a = actual[k]
        out.leaves += 1
        if a.numel() == 0:
            continue
        diff = (a.double() - e.double()).abs()
        if float(diff.max()) > out.max_abs_err:
            out.max_abs_err, out.worst_path = float(diff.max()), f"final[{k}]"
        close = diff <= tol.atol + tol.rtol * e.double().abs()
        if k in key_biases:
            n = e.shape[0] // 3
            close[n:2 * n] = True  # the key third of an attention without time factor: step bound only
            over = diff[n:2 * n] > bound
            if bool(over.any()):
                out.mismatches.append(Mismatch(f"final[{k}] (key part)", "values", bad=int(over.sum()), numel=n,
                                               max_abs_err=float(diff[n:2 * n].max()),
                                               abs_index=(int(diff[n:2 * n].argmax()) + n,)))
        far = ~close
        nfar = int(far.sum())
        allowed = noisy.get(k, torch.zeros_like(far))
        if nfar and (bool((far & ~allowed).any()) or float(diff[far].max()) > bound):
            flat = int(torch.where(far, diff, torch.zeros_like(diff)).argmax())
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
            out.mismatches.append(Mismatch(f"final[{k}]", "values", bad=nfar, numel=far.numel(),
                                           max_abs_err=float(diff.max()), abs_index=idx,
                                           actual_at_worst=float(a.reshape(-1)[flat]),
                                           expected_at_worst=float(e.reshape(-1)[flat]),
                                           detail=f"Adam step bound {bound:.3g}"))
    return out


def legacy_trajectory(legacy, batches: list[dict], kind: str, lr=TRAIN_LR, maxlr=TRAIN_MAXLR,
                      total=TRAIN_TOTAL_EPOCHS, epochs=TRAIN_EPOCHS, state=None):
    """The legacy loop (``reference.training``) with the reseed-per-step protocol."""
    from reference.training import make_optimizer, set_loss, train_one_epoch

    from ..rng import reseed_for_step
    from ..tolerances import GradientNoiseRecorder

    optimizer, scheduler = make_optimizer(legacy, lr=lr, scheduler_maxlr=maxlr, max_epoch=total)
    noise = GradientNoiseRecorder(legacy, optimizer)  # returned: _noise_as_legacy reads its masks and gradients
    loss_fn = set_loss("CrossEntropyLoss")
    losses, lrs = [], []

    def before(step):
        lrs.append(optimizer.param_groups[0]["lr"])
        reseed_for_step(step)

    for epoch in range(epochs):
        losses += train_one_epoch(legacy, batches, optimizer, loss_fn, epoch, kind, before_step=before,
                                  step_offset=epoch * len(batches))
        scheduler.step()
    return losses, lrs, legacy.state_dict(), noise


def gradient_noise_callback(port):
    """A Lightning callback recording the port's per-step gradients into ``port.noise_recorder``."""
    import lightning.pytorch as pl

    from ..tolerances import GradientNoiseRecorder

    port.noise_recorder = GradientNoiseRecorder(port.network)

    class _Noise(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            port.noise_recorder._record(optimizer)

    return _Noise()


def port_trajectory(port, batches: list[dict], epochs=TRAIN_EPOCHS):
    """``Trainer.fit`` on the port with the reseed-per-step callback; returns losses, lrs, final state."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from ..rng import ReseedPerStep

    cb = ReseedPerStep()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[cb, gradient_noise_callback(port)])
    trainer.fit(port, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return cb.losses, cb.lrs, port.network.state_dict()


def _noise_as_legacy(port, kind, legacy) -> dict:
    """Elements allowed to differ after Adam (``tolerances.ADAM_REASON``), under legacy keys: rounding-level
    gradients on either side, and gradients whose legacy and port values of some step disagree relatively."""
    from lightning_port.weight_map import port_to_legacy

    from ..tolerances import STEP_GRAD_RTOL

    template = port.network.state_dict()

    def as_legacy(by_port_key: dict) -> dict:
        full = {k: by_port_key.get(k, torch.zeros_like(v)).to(v.dtype) for k, v in template.items()}
        return port_to_legacy(full, port.config, kind)

    port_rec = port.noise_recorder
    masks = {k: v > 0.5 for k, v in as_legacy({k: m.float() for k, m in port_rec.state_masks().items()}).items()}
    for k, m in legacy.state_masks().items():
        masks[k] = masks[k] | m if k in masks else m
    for gl_step, gp_step in zip(legacy.step_grads(), port_rec.step_grads()):
        gp_legacy = as_legacy(gp_step)
        for k, gl in gl_step.items():
            if k in gp_legacy:
                disagree = (gp_legacy[k] - gl).abs() > STEP_GRAD_RTOL * gl.abs()
                masks[k] = masks[k] | disagree if k in masks else disagree
    return masks


def _port_final_as_legacy(port, kind, final):
    from lightning_port.weight_map import dropped_legacy_keys, port_to_legacy

    drop = set(dropped_legacy_keys(port.config, kind))
    return {k: v for k, v in port_to_legacy(final, port.config, kind).items() if k not in drop}, drop


def check_training(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """Six optimiser steps (3 epochs x 2 batches): the legacy loop vs ``Trainer.fit`` on the port,
    Adam + OneCycleLR per epoch, reseeding ``100 + step`` before each step."""
    from ..tolerances import ADAM_REASON, Tolerance, zero_gradient_key_biases

    out_tol = case.tolerance("training.losses")
    rec = {"training.losses": CheckRecord.new("training.losses", "training", case.model, out_tol),
           "training.lrs": CheckRecord.new("training.lrs", "training", case.model, case.tolerance("training.lrs")),
           "training.final_weights": CheckRecord.new("training.final_weights", "training", case.model,
                                                     Tolerance(out_tol.rtol, out_tol.atol, ADAM_REASON))}

    tol_obj = Tolerance(out_tol.rtol, out_tol.atol, ADAM_REASON)

    def body_fixed(data):
        config = data.draw(case.configs(), label="config")
        seed = data.draw(_init_seed(case), label="init_seed")
        pair = make_pair(case, config, seed, mutate=ctx.mutate, lr=TRAIN_LR, scheduler_maxlr=TRAIN_MAXLR,
                         max_epochs=TRAIN_TOTAL_EPOCHS)
        b = data.draw(case.inputs(config), label="batch")
        half = max(b.size // 2, 1)
        batches = [b.rows(slice(0, half)).batch, b.rows(slice(half, None)).batch if b.size > 1 else b.batch]
        l_loss, l_lrs, l_final, l_noisy = legacy_trajectory(pair.legacy, batches, case.kind)
        p_loss, p_lrs, p_final = port_trajectory(pair.port, batches)
        context = pair.context(batch=b.recipe)
        actual, drop = _port_final_as_legacy(pair.port, case.kind, p_final)
        expected = {k: v for k, v in l_final.items() if k not in drop}
        return {"training.losses": compare(p_loss, l_loss, out_tol, path="loss", context=context),
                "training.lrs": compare(p_lrs, l_lrs, case.tolerance("training.lrs"), path="lr", context=context),
                "training.final_weights": adam_weights_comparison(
                    actual, expected, l_lrs, tol_obj, context, noisy=_noise_as_legacy(pair.port, case.kind, l_noisy),
                    key_biases=zero_gradient_key_biases(pair.legacy))}

    return run_property(rec, ctx, case, 0.25, body_fixed)
