"""The `loss` category: every legacy loss function vs the port's, values and input gradients."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..compare import compare
from ..report import CheckRecord
from .base import RunContext, run_property


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
    from .. import strategies as S
    from ..cases import CASES
    from ..tolerances import tolerance_for

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
