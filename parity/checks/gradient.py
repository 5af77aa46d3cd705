"""The `gradient` category: train-mode outputs, loss and every parameter's gradient, dropout on."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..cases import ParityCase
from ..compare import compare
from ..pairs import make_pair, port_grads_as_legacy, run_train
from ..report import CheckRecord
from .base import RunContext, _init_seed, run_property


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
        from ..pairs import dropped_keys

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
