"""The parity properties, one function per claim category, all driven by the case registry.

Each ``check_<category>(case, ctx)`` returns :class:`~parity.report.CheckRecord` s. Properties run
under hypothesis (``@given(data=st.data())``); an example's comparisons are added to the records,
and a failing comparison raises :class:`ParityFailure` so hypothesis shrinks it and the report
keeps the (shrunk) reproducer: seed, config and input recipe.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import given
from hypothesis import strategies as st

from .cases import ParityCase
from .compare import Comparison, compare, from_problems
from .pairs import Mutation, make_pair, port_grads_as_legacy, run_eval, run_train
from .profiles import check_settings
from .report import CheckRecord
from .rng import seeded


class ParityFailure(AssertionError):
    pass


@dataclass
class RunContext:
    profile: str = "parity"
    mutate: Mutation | None = None  # planted bugs (tests only)
    weight_scale: float = 1.0
    log: Callable[[str], None] = print
    shrink: bool = True
    extra: dict = field(default_factory=dict)


def run_property(records: dict[str, CheckRecord], ctx: RunContext, case: ParityCase, weight: float,
                 body: Callable[[st.DataObject], dict[str, Comparison]]) -> list[CheckRecord]:
    """Run ``body`` as a hypothesis property; each returned comparison goes to the record of that name."""
    sett = check_settings(ctx.profile, weight * case.weight * ctx.weight_scale,
                          shrink=ctx.shrink and not case.full_size)

    @sett
    @given(data=st.data())
    def prop(data):
        comps = body(data)
        bad = []
        for name, comp in comps.items():
            records[name].add(comp)
            if not comp.passed:
                bad.append(f"[{name}] " + comp.report())
        if bad:
            raise ParityFailure("\n".join(bad))

    try:
        prop()
    except ParityFailure as e:
        # the last failure hypothesis reports is the shrunk one; keep it first
        for rec in records.values():
            if rec.status == "failed":
                rec.failures.insert(0, "minimal failing example:\n" + str(e)[:4000])
                del rec.failures[5:]
    except Exception as e:  # a crash in either model is a failed check, with its traceback
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
        for rec in records.values():
            rec.error(tb)
    return list(records.values())


def _init_seed(case: ParityCase) -> st.SearchStrategy[int]:
    return st.just(1234) if case.full_size else st.integers(0, 2**16)


# --------------------------------------------------------------------------- structure
def check_structure(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """Every legacy parameter maps to exactly one port parameter of the same shape, or is a listed
    duplicate of a shared table, or is in the divergence register as dropped; both directions."""
    from lightning_port.weight_map import (
        dropped_legacy_keys,
        duplicate_legacy_keys,
        legacy_to_port,
        port_to_legacy,
    )

    rec = {"structure.mapping": CheckRecord.new("structure.mapping", "structure", case.model,
                                                case.tolerance("structure.roundtrip")),
           "structure.roundtrip": CheckRecord.new("structure.roundtrip", "structure", case.model,
                                                  case.tolerance("structure.roundtrip"))}

    def body(data):
        config = data.draw(case.configs(), label="config")
        legacy = case.build_reference(config, seed=0)
        port = case.build_port(config, seed=0)
        cfg, kind = port.config, case.kind
        lsd, psd = legacy.state_dict(), port.network.state_dict()
        problems: list[str] = []
        mapped = legacy_to_port(lsd, cfg, kind)
        if set(mapped) != set(psd):
            problems.append(f"legacy_to_port keys differ from the port's: missing {sorted(set(psd) - set(mapped))}, "
                            f"extra {sorted(set(mapped) - set(psd))}")
        for k in set(mapped) & set(psd):
            if mapped[k].shape != psd[k].shape:
                problems.append(f"{k}: mapped shape {tuple(mapped[k].shape)} != port {tuple(psd[k].shape)}")
        dropped, dups = set(dropped_legacy_keys(cfg, kind)), duplicate_legacy_keys(cfg, kind)
        # one legacy tensor -> one port tensor: identify tensors by storage (the map does not copy)
        by_ptr: dict[tuple, list[str]] = {}
        for k, v in lsd.items():
            if v.numel():
                by_ptr.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
        for pk, pv in mapped.items():
            if not pv.numel():
                continue
            sources = [k for k in by_ptr.get((pv.data_ptr(), tuple(pv.shape)), []) if k not in dups]
            if len(sources) != 1:
                problems.append(f"port {pk} comes from {len(sources)} legacy keys {sources}")
        used = {(v.data_ptr(), tuple(v.shape)) for v in mapped.values() if v.numel()}
        for k, v in lsd.items():
            if k in dropped or k in dups or not v.numel():
                continue
            if (v.data_ptr(), tuple(v.shape)) not in used:
                problems.append(f"legacy {k} is neither mapped, a listed duplicate, nor listed as dropped")
        # dropped parameters must really be unused: no gradient in a legacy training step
        comps = {"structure.mapping": from_problems(problems, case.tolerance("structure.roundtrip"),
                                                    context={"config": config.kwargs})}
        # back: port -> legacy loads strictly and gives the same tensors for every mapped key
        back = port_to_legacy(psd, cfg, kind)
        legacy2 = case.build_reference(config)
        legacy2.load_state_dict(back, strict=True)
        want = {k: v for k, v in port_to_legacy(mapped, cfg, kind).items() if k not in dropped}
        got = {k: v for k, v in lsd.items() if k not in dropped}
        comps["structure.roundtrip"] = compare(want, got, case.tolerance("structure.roundtrip"), path="",
                                               context={"config": config.kwargs})
        return comps

    return run_property(rec, ctx, case, 0.5, body)


# --------------------------------------------------------------------------- init
def check_init(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """``torch.manual_seed(s)`` + legacy constructor vs + port constructor: the same weights
    (through the map, bit-exact) and the same eval outputs under the same seed."""
    from lightning_port.weight_map import legacy_to_port

    rec = {"init.weights": CheckRecord.new("init.weights", "init", case.model, case.tolerance("init.weights")),
           "init.outputs": CheckRecord.new("init.outputs", "init", case.model, case.tolerance("init.outputs"))}

    def body(data):
        config = data.draw(case.configs(), label="config")
        seed = data.draw(_init_seed(case), label="init_seed")
        legacy = case.build_reference(config, seed=seed)
        port = case.build_port(config, seed=seed)
        if ctx.mutate is not None:
            ctx.mutate(port)
        ctxd = {"config": config.kwargs, "init_seed": seed}
        comps = {"init.weights": compare(dict(port.network.state_dict()),
                                         legacy_to_port(legacy.state_dict(), port.config, case.kind),
                                         case.tolerance("init.weights"), context=ctxd)}
        batch = data.draw(case.inputs(config), label="batch")
        fseed = data.draw(st.integers(0, 2**16), label="forward_seed")
        comps["init.outputs"] = compare(run_eval(port, batch, case.kind, fseed), run_eval(legacy, batch, case.kind, fseed),
                                        case.tolerance("init.outputs"),
                                        context=dict(ctxd, forward_seed=fseed, batch=batch.recipe))
        return comps

    return run_property(rec, ctx, case, 0.5, body)


# --------------------------------------------------------------------------- forward
def _weights_comp(pair, tol) -> Comparison:
    """The port's weights mapped back to legacy names vs the legacy weights (names the place of a
    changed port tensor)."""
    from lightning_port.weight_map import port_to_legacy

    from .pairs import dropped_keys

    back = port_to_legacy(pair.port.network.state_dict(), pair.port.config, pair.kind)
    drop = set(dropped_keys(pair.port, pair.kind))
    lsd = pair.legacy.state_dict()
    return compare({k: v for k, v in back.items() if k not in drop}, {k: v for k, v in lsd.items() if k not in drop},
                   tol, path="weights", context=pair.context())


def check_forward(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """Eval outputs (scores, ensemble) equal under the same seed (MoE coin flips included), on the
    same weights; also the port's weights read back through the map."""
    rec = {"forward.eval_outputs": CheckRecord.new("forward.eval_outputs", "forward", case.model,
                                                   case.tolerance("forward.eval_outputs")),
           "forward.weights": CheckRecord.new("forward.weights", "forward", case.model, case.tolerance("init.weights"),
                                              notes="port weights read back through the map == legacy weights")}

    def body(data):
        config = data.draw(case.configs(), label="config")
        seed = data.draw(_init_seed(case), label="init_seed")
        pair = make_pair(case, config, seed, mutate=ctx.mutate)
        batch = data.draw(case.inputs(config), label="batch")
        fseed = data.draw(st.integers(0, 2**16), label="forward_seed")
        comps = {"forward.weights": _weights_comp(pair, case.tolerance("init.weights"))}
        comps["forward.eval_outputs"] = compare(
            run_eval(pair.port, batch, case.kind, fseed), run_eval(pair.legacy, batch, case.kind, fseed),
            case.tolerance("forward.eval_outputs"), context=pair.context(forward_seed=fseed, batch=batch.recipe))
        return comps

    return run_property(rec, ctx, case, 1.0, body)


# --------------------------------------------------------------------------- gradient
def check_gradient(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """Train mode, dropout on, same seed: scores, CrossEntropy(sum) loss and every parameter's
    gradient mapped back to its legacy name; the legacy's dropped parameters get no gradient."""
    rec = {"gradient.train_outputs": CheckRecord.new("gradient.train_outputs", "gradient", case.model,
                                                     case.tolerance("gradient.train_outputs")),
           "gradient.grads": CheckRecord.new("gradient.grads", "gradient", case.model, case.tolerance("gradient.grads"))}

    def body(data):
        config = data.draw(case.configs(), label="config")
        seed = data.draw(_init_seed(case), label="init_seed")
        pair = make_pair(case, config, seed, mutate=ctx.mutate)
        batch = data.draw(case.inputs(config), label="batch")
        tseed = data.draw(st.integers(0, 2**16), label="train_seed")
        lparams = dict(pair.legacy.named_parameters())
        pparams = dict(pair.port.network.named_parameters())
        out_l, g_l = run_train(pair.legacy, batch, case.kind, tseed, lparams)
        out_p, g_p = run_train(pair.port, batch, case.kind, tseed, pparams)
        context = pair.context(train_seed=tseed, batch=batch.recipe)
        comps = {"gradient.train_outputs": compare(out_p, out_l, case.tolerance("gradient.train_outputs"),
                                                   context=context)}
        from .pairs import dropped_keys

        drop = set(dropped_keys(pair.port, case.kind))
        got = port_grads_as_legacy(pair, g_p)
        actual = {k: got[k] for k in lparams if k not in drop}
        expected = {k: (g if g is not None else torch.zeros_like(lparams[k])) for k, g in g_l.items() if k not in drop}
        comp = compare(actual, expected, case.tolerance("gradient.grads"), path="grad", context=context)
        leaked = [k for k in drop if k in g_l and g_l[k] is not None and bool(g_l[k].abs().sum() > 0)]
        if leaked:
            comp.merge(compare({"dropped_with_grad": len(leaked)}, {"dropped_with_grad": 0},
                               case.tolerance("gradient.grads"), context={"keys": leaked}))
        comps["gradient.grads"] = comp
        return comps

    return run_property(rec, ctx, case, 1.0, body)


# --------------------------------------------------------------------------- loss
def _loss_pairs(d):
    """(name, legacy loss, port loss, takes epoch) for one draw of hyperparameters."""
    from lightning_port import losses as P
    from reference import losses as R
    from reference.training import set_loss

    red = d["reduction"]
    out = [
        ("CrossEntropyLoss(set_loss)", set_loss("CrossEntropyLoss"), P.build_loss("CrossEntropyLoss"), False),
        (f"FocalLoss(g={d['gamma']},a={d['alpha']},{red})", R.FocalLoss(d["gamma"], d["alpha"], red),
         P.FocalLoss(d["gamma"], d["alpha"], red), False),
        (f"Cyclical_FocalLoss(gn={d['gamma_neg']},hc={d['gamma_hc']},eps={d['eps']},{red},E={d['epochs']},f={d['factor']})",
         R.Cyclical_FocalLoss(0, d["gamma_neg"], d["gamma_hc"], d["eps"], red, d["epochs"], d["factor"]),
         P.CyclicalFocalLoss(0, d["gamma_neg"], d["gamma_hc"], d["eps"], red, d["epochs"], d["factor"]), True),
        (f"ASLSingleLabel(gn={d['gamma_neg']},eps={d['eps']},{red})", R.ASLSingleLabel(0, d["gamma_neg"], d["eps"], red),
         P.ASLSingleLabel(0, d["gamma_neg"], d["eps"], red), False),
    ]
    for name in ("FocalLoss", "Cyclical_FocalLoss", "ASLSingleLabel"):  # set_loss defaults vs build_loss defaults
        out.append((f"{name}(set_loss defaults)", set_loss(name, max_epoch=d["epochs"]),
                    P.build_loss(name, epochs=d["epochs"]), name == "Cyclical_FocalLoss"))
    return out


def check_loss(ctx: RunContext) -> list[CheckRecord]:
    """Every loss's value and input-gradient, every reduction: ``reference.losses`` (and legacy
    ``set_loss``) vs ``lightning_port.losses`` (and ``build_loss``)."""
    from . import strategies as S
    from .cases import CASES
    from .tolerances import tolerance_for

    case0 = CASES[0]
    tol = tolerance_for("loss.value")
    rec = {"loss.value": CheckRecord.new("loss.value", "loss", "losses", tol),
           "loss.input_grad": CheckRecord.new("loss.input_grad", "loss", "losses", tol)}

    def body(data):
        draw = data.draw(S.loss_inputs(), label="logits")
        d = {"reduction": data.draw(st.sampled_from(["sum", "mean", "none"]), label="reduction"),
             "gamma": data.draw(st.sampled_from([2.0, 0.0, 1.0, 3.5])), "alpha": data.draw(st.sampled_from([0.25, 1.0, 0.5])),
             "gamma_neg": data.draw(st.sampled_from([4, 0, 2])), "gamma_hc": data.draw(st.sampled_from([0, 1, 2])),
             "eps": data.draw(st.sampled_from([0.1, 0.0, 0.3])), "epochs": data.draw(st.integers(2, 12)),
             "factor": data.draw(st.sampled_from([2, 1, 3]))}
        epoch = data.draw(st.integers(0, d["epochs"] - 1), label="epoch")
        values_p, values_l, grads_p, grads_l = {}, {}, {}, {}
        for name, lf, pf, with_epoch in _loss_pairs(d):
            res = []
            for fn in (lf, pf):
                x = draw.logits.clone().requires_grad_(True)
                v = fn(x, draw.target, epoch) if with_epoch else fn(x, draw.target)
                w = torch.linspace(0.5, 1.5, v.numel()).reshape(v.shape) if v.dim() else 1.0
                (v * w).sum().backward()
                res.append((v.detach(), x.grad))
            values_l[name], grads_l[name] = res[0]
            values_p[name], grads_p[name] = res[1]
        context = {"logits": draw.recipe, "hyper": d, "epoch": epoch}
        return {"loss.value": compare(values_p, values_l, tol, context=context),
                "loss.input_grad": compare(grads_p, grads_l, tol, context=context)}

    return run_property(rec, ctx, case0, 2.0, body)


# --------------------------------------------------------------------------- training
TRAIN_LR, TRAIN_MAXLR, TRAIN_TOTAL_EPOCHS, TRAIN_EPOCHS = 1e-5, 1e-3, 4, 3  # the recorded trajectory protocol


def adam_weights_comparison(actual: dict, expected: dict, lrs: list[float], tol, context: dict,
                            noisy: dict | None = None) -> Comparison:
    """Final weights after Adam steps under the policy in ``tolerances.ADAM_REASON``; ``noisy`` maps
    legacy keys to the elements whose legacy gradient was at rounding level in some step."""
    from .compare import Mismatch

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
        if k.endswith("in_proj_bias"):
            n = e.shape[0] // 3
            close[n:2 * n] = True  # the key third: step bound only
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

    from .rng import reseed_for_step
    from .tolerances import GradientNoiseRecorder

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

    from .tolerances import GradientNoiseRecorder

    port.noise_recorder = GradientNoiseRecorder(port.network)

    class _Noise(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            port.noise_recorder._record(optimizer)

    return _Noise()


def port_trajectory(port, batches: list[dict], epochs=TRAIN_EPOCHS):
    """``Trainer.fit`` on the port with the reseed-per-step callback; returns losses, lrs, final state."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from .rng import ReseedPerStep

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

    from .tolerances import STEP_GRAD_RTOL

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
    from .tolerances import ADAM_REASON, Tolerance

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
                "training.final_weights": adam_weights_comparison(actual, expected, l_lrs, tol_obj, context,
                                                                  noisy=_noise_as_legacy(pair.port, case.kind,
                                                                                         l_noisy))}

    return run_property(rec, ctx, case, 0.25, body_fixed)


# --------------------------------------------------------------------------- metrics
def _port_auroc(scores, labels) -> float:
    """The port's AUROC metric object (as its LightningModule builds it) on (scores, labels)."""
    try:
        from lightning_port.module import _metrics

        metric = _metrics(2)["auroc"]
    except (ImportError, KeyError):  # pragma: no cover - the port's private helper moved
        import torchmetrics

        metric = torchmetrics.AUROC(task="binary")
    metric.update(torch.as_tensor(scores), torch.as_tensor(labels))
    return float(metric.compute())


def check_metrics(ctx: RunContext) -> list[CheckRecord]:
    """AUROC: the port's torchmetrics vs legacy sklearn ``legacy_auc`` (drawn scores with ties and
    extremes; and end to end: ``Trainer.validate``'s ``val/auroc`` vs the legacy evaluation pass).
    Score, tag files and the percentile table: byte-identical between the legacy writers
    (``reference.training``) and the port's (``lightning_port.scoring``)."""
    import tempfile
    from pathlib import Path

    from reference import training as R

    from . import strategies as S
    from .cases import CASES
    from .tolerances import tolerance_for

    case0 = CASES[0]
    tol = tolerance_for("metrics.auroc")
    rec = {"metrics.auroc": CheckRecord.new("metrics.auroc", "metrics", "metrics", tol,
                                            notes="torchmetrics binary AUROC vs sklearn roc_auc_score"),
           "metrics.score_files": CheckRecord.new("metrics.score_files", "metrics", "metrics",
                                                  tolerance_for("metrics.score_files")),
           "metrics.percentile_table": CheckRecord.new("metrics.percentile_table", "metrics", "metrics",
                                                       tolerance_for("metrics.percentile_table"))}
    try:
        from lightning_port import scoring as P
    except ImportError as e:  # pragma: no cover
        for k in ("metrics.score_files", "metrics.percentile_table"):
            rec[k].error(f"lightning_port.scoring not importable: {e}")
        P = None

    def body(data):
        scores, labels, recipe = data.draw(S.score_arrays(), label="scores")
        comps = {"metrics.auroc": compare(_port_auroc(scores, labels), R.legacy_auc(labels, scores), tol,
                                          path="auroc", context=recipe)}
        if P is not None:
            with tempfile.TemporaryDirectory() as d:
                d = Path(d)
                R.write_score_files(d / "legacy", scores, labels, scores[::-1].copy(), labels)
                (d / "port").mkdir()
                P.write_score_file(d / "port/score_file.csv", scores)
                P.write_tag_file(d / "port/tag_file.csv", labels)
                P.write_score_file(d / "port/cali_score_file.csv", scores[::-1].copy())
                P.write_tag_file(d / "port/cali_tag_file.csv", labels)
                P.write_percentile_table(d / "port/percentile_score.pkl", scores[::-1].copy())
                problems = []
                for name in ("score_file.csv", "tag_file.csv", "cali_score_file.csv", "cali_tag_file.csv"):
                    if (d / "legacy" / name).read_bytes() != (d / "port" / name).read_bytes():
                        problems.append(f"{name}: bytes differ")
                comps["metrics.score_files"] = from_problems(problems, tolerance_for("metrics.score_files"),
                                                             path="score_files", context=recipe)
                same = (d / "legacy/percentile_score.pkl").read_bytes() == (d / "port/percentile_score.pkl").read_bytes()
                comps["metrics.percentile_table"] = from_problems(
                    [] if same else ["percentile_score.pkl: bytes differ"], tolerance_for("metrics.percentile_table"),
                    path="percentile_score.pkl", context=recipe)
        return comps

    records = run_property(rec, ctx, case0, 2.0, body)
    records.append(_auroc_end_to_end(ctx))
    return records


def _auroc_end_to_end(ctx: RunContext) -> CheckRecord:
    """``Trainer.validate`` on the port (its logged ``val/auroc``) vs the legacy evaluation pass +
    ``legacy_auc`` on the same weights and batches (a no-MoE model: eval is deterministic)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from reference.training import evaluate, legacy_auc

    from . import strategies as S
    from .cases import case as get_case
    from .tolerances import tolerance_for

    tol = tolerance_for("metrics.auroc")
    rec = CheckRecord.new("metrics.val_auroc_end_to_end", "metrics", "single:tiny-plain", tol,
                          notes="Trainer.validate val/auroc vs legacy evaluate + legacy_auc")
    c = get_case("single:tiny-plain")
    try:
        from .cases import TINY_PLAIN

        config = S.ModelConfig(dict(TINY_PLAIN, n_classes=2), "tiny-plain")
        for seed in range(3):
            pair = make_pair(c, config, seed, mutate=ctx.mutate)
            batches = [S.make_batch(config, "single", [config.seq_len, 0, 3, 1, 2, 5, 4, 6][: 8], 100 * seed + i).batch
                       for i in range(3)]
            for i, b in enumerate(batches):
                b["y"] = torch.tensor([0, 1] * 4)[torch.randperm(8, generator=torch.Generator().manual_seed(i))]
            probs, labels, _ = evaluate(pair.legacy, batches, "single")
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False)
            res = trainer.validate(pair.port, DataLoader(batches, batch_size=None), verbose=False)[0]
            rec.add(compare(res["val/auroc"], legacy_auc(labels, probs), tol, path="val/auroc",
                            context={"config": config.kwargs, "seed": seed}))
    except Exception as e:
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return rec


# --------------------------------------------------------------------------- recorded fixtures
def check_fixtures(ctx: RunContext) -> list[CheckRecord]:
    """The port vs the recorded legacy runs (parity/fixtures; held-out ones via TSA_LEGACY_FIXTURES):
    eval seeds 7 and 8 (scores, ensemble), train seed 9 (scores, loss, every gradient or its
    summary), and the six-step trajectory through ``Trainer.fit``."""
    from lightning_port.weight_map import legacy_to_port

    from .fixtures import all_cases, forward_args
    from .tolerances import ADAM_REASON, Tolerance, tolerance_for

    records = []
    for fx in all_cases():
        model = f"{fx.kind}:fixture/{fx.name}"
        recs = {n: CheckRecord.new(n, cat, model, tolerance_for(tn)) for n, cat, tn in [
            ("fixture.eval_seed7_seed8", "forward", "forward.eval_outputs"),
            ("fixture.train_seed9_outputs", "gradient", "gradient.train_outputs"),
            ("fixture.train_seed9_grads", "gradient", "gradient.grads")]}
        try:
            from .cases import port_class

            kw = dict(fx.kwargs)
            if fx.kind == "dual":
                kw.pop("use_mlp", None)
            port = port_class(fx.kind)(**kw)
            port.network.load_state_dict(legacy_to_port(fx.state_dict, port.config, fx.kind), strict=True)
            if ctx.mutate is not None:
                ctx.mutate(port)
            args, kwargs = forward_args(fx.inputs, fx.kind)
            port.eval()
            got, want = {}, {}
            with torch.no_grad():
                for s in (7, 8):
                    with seeded(s):
                        scores, ens = port(*args, **kwargs)
                    got[f"eval_seed{s}_scores"] = scores
                    want[f"eval_seed{s}_scores"] = fx.expected[f"eval_seed{s}_scores"]
                    if s == 7:
                        got["eval_seed7_ensemble"], want["eval_seed7_ensemble"] = ens, fx.expected["eval_seed7_ensemble"]
            recs["fixture.eval_seed7_seed8"].add(compare(got, want, recs["fixture.eval_seed7_seed8"].tol(),
                                                         context={"fixture": str(fx.path)}))
            port.train()
            with seeded(9):
                scores, _ = port(*args, **kwargs)
                loss = torch.nn.functional.cross_entropy(scores, fx.inputs["y"], reduction="sum")
                loss.backward()
            recs["fixture.train_seed9_outputs"].add(compare(
                {"scores": scores.detach(), "loss": loss.detach()},
                {"scores": fx.expected["train_seed9_scores"], "loss": fx.expected["train_seed9_loss"]},
                recs["fixture.train_seed9_outputs"].tol(), context={"fixture": str(fx.path)}))
            from lightning_port.weight_map import dropped_legacy_keys

            grads = port_grads_as_legacy(_KindPair(port, fx.kind),
                                         {n: p.grad for n, p in port.network.named_parameters()})
            drop = set(dropped_legacy_keys(port.config, fx.kind))
            gtol = recs["fixture.train_seed9_grads"].tol()
            if "train_seed9_grads" in fx.expected:
                exp = {k: (v if v is not None else torch.zeros_like(fx.state_dict[k]))
                       for k, v in fx.expected["train_seed9_grads"].items() if k not in drop}
                act = {k: grads[k] for k in exp}
                recs["fixture.train_seed9_grads"].add(compare(act, exp, gtol, path="grad", context={"fixture": str(fx.path)}))
            else:  # full size: [norm, sum, abs-max] summaries; the sum of a cancelling gradient is noise
                exp, act = {}, {}
                for k, summ in fx.expected["train_seed9_grad_summary"].items():
                    if k in drop:
                        continue
                    g = grads[k]
                    if summ is None:
                        summ = torch.zeros(3)
                    exp[k] = summ[[0, 2]]
                    act[k] = torch.stack([g.norm(), g.abs().max()]) if g.numel() else torch.zeros(2)
                recs["fixture.train_seed9_grads"].add(compare(act, exp, gtol, path="grad_norm_absmax",
                                                              context={"fixture": str(fx.path)}))
        except Exception as e:
            for r in recs.values():
                r.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
        records += recs.values()
        if fx.trajectory is not None and not fx.full_size:
            rec = CheckRecord.new("fixture.trajectory", "training", model, tolerance_for("training.losses"),
                                  notes="Trainer.fit on the port vs the recorded legacy six-step run")
            try:
                port = port_class(fx.kind)(**kw, lr=TRAIN_LR, scheduler_maxlr=TRAIN_MAXLR, max_epochs=TRAIN_TOTAL_EPOCHS)
                port.network.load_state_dict(legacy_to_port(fx.state_dict, port.config, fx.kind), strict=True)
                if ctx.mutate is not None:
                    ctx.mutate(port)
                n = fx.inputs["y"].shape[0]
                batches = [_fixture_batch(fx, rows) for rows in (slice(0, n // 2), slice(n // 2, n))]
                losses, lrs, final = port_trajectory(port, batches)
                # the legacy side's rounding-level gradient elements, from reference/ on the same recording
                from reference import build_model
                legacy = build_model(fx.kind, **fx.kwargs)
                legacy.load_state_dict(fx.state_dict, strict=True)
                *_, noisy = legacy_trajectory(legacy, batches, fx.kind)
                t = fx.trajectory
                actual, drop = _port_final_as_legacy(port, fx.kind, final)
                comp = compare({"loss": losses}, {"loss": list(t["loss"])}, rec.tol(), context={"fixture": str(fx.path)})
                comp.merge(compare({"lr": lrs}, {"lr": list(t["lr"])}, tolerance_for("training.lrs")))
                comp.merge(adam_weights_comparison(actual, {k: v for k, v in t["final_state_dict"].items() if k not in drop},
                                                   list(t["lr"]), Tolerance(rec.rtol, rec.atol, ADAM_REASON), {},
                                                   noisy=_noise_as_legacy(port, fx.kind, noisy)))
                rec.add(comp)
            except Exception as e:
                rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
            records.append(rec)
    return records


class _KindPair:
    """The two attributes `port_grads_as_legacy` reads, for a port without a legacy twin."""

    def __init__(self, port, kind):
        self.port, self.kind = port, kind


def _fixture_batch(fx, rows) -> dict:
    """Recorded inputs -> the legacy dataset dict format (what ``training_step`` consumes)."""
    inp = fx.inputs
    out = {"y": inp["y"][rows]}
    if fx.kind == "single":
        out.update(x_seq_cat=inp["x_cat"][rows], x_seq_num=inp["x_num"][rows], time_to_last=inp["time_seq"][rows],
                   not_padded=inp["not_padded"][rows])
    else:
        for s in ("_cid", "_ccid"):
            out.update({f"x_seq_cat{s}": inp[f"x_seq_cat{s}"][rows], f"x_seq_num{s}": inp[f"x_seq_num{s}"][rows],
                        f"time_to_last{s}": inp[f"time_seq{s}"][rows], f"not_padded{s}": inp[f"not_padded{s}"][rows]})
    if inp.get("x_engineered") is not None:
        out["x_engineered_num"] = inp["x_engineered"][rows]
    return out


# --------------------------------------------------------------------------- onnx
ONNX_POLICY = "threshold"


def check_onnx(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """onnxruntime vs the eager port (deterministic policy ``threshold``): export once per config,
    then hypothesis-drawn batches of sizes other than the export batch (1..N, padding, empty and
    full card histories)."""
    import tempfile
    from pathlib import Path

    from .fixtures import DUAL_ARGS, DUAL_KWARGS, SINGLE_ARGS, SINGLE_KWARGS
    from .pairs import forward_inputs

    tol = case.tolerance("onnx.scores")
    rec = CheckRecord.new("onnx.scores", "onnx", case.model, tol,
                          notes=f"policy {ONNX_POLICY}; exported with lightning_port.export.export_onnx")
    try:
        from lightning_port import export as X
    except ImportError as e:
        from .report import not_covered

        return [not_covered("onnx", case.model, f"lightning_port.export not importable: {e}")]
    from . import strategies as S
    from .cases import NAMED_CONFIGS

    kw = dict(NAMED_CONFIGS["tiny-dual" if case.model == "dual:tiny" else case.config_id])
    if case.kind == "dual":
        kw.pop("use_mlp", None)
    config = S.ModelConfig(kw, case.config_id)
    try:
        pair = make_pair(case, config, 7, moe_eval_policy=ONNX_POLICY, mutate=ctx.mutate)
        with tempfile.TemporaryDirectory() as d:
            path, _ = X.export_onnx(pair.port, Path(d) / "m.onnx", moe_eval_policy=ONNX_POLICY)
            sess = X.ort_session(path)
            names = (SINGLE_ARGS + SINGLE_KWARGS) if case.kind == "single" else (DUAL_ARGS + DUAL_KWARGS)

            def body(data):
                b = data.draw(case.inputs(config), label="batch")
                args, kwargs = forward_inputs(b, case.kind)
                named = dict(zip(names, (*args, *kwargs.values())))
                ort = X.run_onnx(sess, named)
                eager = run_eval(pair.port, b, case.kind, 0)
                return {"onnx.scores": compare({"scores": ort["scores"]}, {"scores": eager["scores"]}, tol,
                                               context={"config": config.kwargs, "batch": b.recipe})}

            run_property({"onnx.scores": rec}, ctx, case, 1.0, body)
    except Exception as e:
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return [rec]
