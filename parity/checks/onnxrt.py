"""The `onnx` category: onnxruntime vs the eager port on batches other than the export batch."""

from __future__ import annotations

import traceback

from ..cases import ParityCase
from ..compare import compare
from ..pairs import make_pair, run_eval
from ..report import CheckRecord
from .base import RunContext, run_property

ONNX_POLICY = "threshold"


def check_onnx(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """onnxruntime vs the eager port (deterministic policy ``threshold``): export once per config,
    then hypothesis-drawn batches of sizes other than the export batch (1..N, padding, empty and
    full card histories)."""
    import tempfile
    from pathlib import Path

    from ..fixtures import DUAL_ARGS, DUAL_KWARGS, SINGLE_ARGS, SINGLE_KWARGS
    from ..pairs import forward_inputs

    tol = case.tolerance("onnx.scores")
    rec = CheckRecord.new("onnx.scores", "onnx", case.model, tol,
                          notes=f"policy {ONNX_POLICY}; exported with lightning_port.export.export_onnx")
    try:
        from lightning_port import export as X
    except ImportError as e:
        from ..report import not_covered

        return [not_covered("onnx", case.model, f"lightning_port.export not importable: {e}")]
    from .. import strategies as S
    from ..cases import NAMED_CONFIGS

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
