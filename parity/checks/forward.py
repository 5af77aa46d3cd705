"""The `forward` category: eval outputs under the same seed, MoE coin flips included."""

from __future__ import annotations

from hypothesis import strategies as st

from ..cases import ParityCase
from ..compare import Comparison, compare
from ..pairs import make_pair, run_eval
from ..report import CheckRecord
from .base import RunContext, _init_seed, run_property


def _weights_comp(pair, tol) -> Comparison:
    """The port's weights mapped back to legacy names vs the legacy weights (names the place of a
    changed port tensor)."""
    from lightning_port.weight_map import port_to_legacy

    from ..pairs import dropped_keys

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
