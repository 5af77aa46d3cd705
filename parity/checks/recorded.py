"""The recorded legacy fixtures (parity/fixtures; held-out ones via TSA_LEGACY_FIXTURES) against the
port; its records belong to the forward, gradient and training categories."""

from __future__ import annotations

import traceback

import torch

from ..compare import compare
from ..pairs import port_grads_as_legacy
from ..report import CheckRecord
from ..rng import seeded
from .base import RunContext
from .training import (
    TRAIN_LR,
    TRAIN_MAXLR,
    TRAIN_TOTAL_EPOCHS,
    _noise_as_legacy,
    _port_final_as_legacy,
    adam_weights_comparison,
    legacy_trajectory,
    port_trajectory,
)


def check_fixtures(ctx: RunContext) -> list[CheckRecord]:
    """The port vs the recorded legacy runs (parity/fixtures; held-out ones via TSA_LEGACY_FIXTURES):
    eval seeds 7 and 8 (scores, ensemble), train seed 9 (scores, loss, every gradient or its
    summary), and the six-step trajectory through ``Trainer.fit``."""
    from lightning_port.weight_map import legacy_to_port

    from ..fixtures import all_cases, forward_args
    from ..tolerances import ADAM_REASON, Tolerance, tolerance_for, zero_gradient_key_biases

    records = []
    for fx in all_cases():
        model = f"{fx.kind}:fixture/{fx.name}"
        recs = {n: CheckRecord.new(n, cat, model, tolerance_for(tn)) for n, cat, tn in [
            ("fixture.eval_seed7_seed8", "forward", "forward.eval_outputs"),
            ("fixture.train_seed9_outputs", "gradient", "gradient.train_outputs"),
            ("fixture.train_seed9_grads", "gradient", "gradient.grads")]}
        try:
            from ..cases import port_class

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
                                                   noisy=_noise_as_legacy(port, fx.kind, noisy),
                                                   key_biases=zero_gradient_key_biases(legacy)))
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
