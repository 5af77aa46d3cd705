"""The `init` category: the same seed gives the same initial weights and function."""

from __future__ import annotations

from hypothesis import strategies as st

from ..cases import ParityCase
from ..compare import compare
from ..pairs import run_eval
from ..report import CheckRecord
from .base import RunContext, _init_seed, run_property


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
