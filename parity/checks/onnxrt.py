"""The `onnx` category: onnxruntime vs the eager port on batches other than the export batch -- the fp32
export as ``tsa-export-onnx`` writes it (optimised offline for ONNX Runtime), and the int8 export."""

from __future__ import annotations

import traceback

from ..cases import ParityCase
from ..compare import compare
from ..pairs import make_pair, run_eval
from ..report import CheckRecord
from .base import RunContext, run_property

ONNX_POLICY = "threshold"
# The tiny configurations (D 8, E 16) have no matmul as wide as the export's default int8 width (32) in the
# single models, so the int8 check quantizes every weight matmul at least 16 wide: it then has quantized
# kernels to check on every tiny configuration.
INT8_MIN_WIDTH = 16
# int8 is offered for models without MoE only: top-2 routing is discontinuous, and int8 noise changes the
# experts of some rows (up to 6.8e-2 on the score at the legacy default shape, 2.8e-2 on the tiny MoE
# configuration found by this check; docs/onnx.md). The int8 check runs the MoE configurations with MoE
# off (every other switch kept: time, bias, heads, engineered features, the dual gate).
INT8_MOE_NOTE = "MoE off: int8 is not offered for MoE models (routing flips under int8 noise, docs/onnx.md)"


def check_onnx(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """onnxruntime vs the eager port (deterministic policy ``threshold``): export once per config,
    then hypothesis-drawn batches of sizes other than the export batch (1..N, padding, empty and
    full card histories)."""
    import tempfile
    from pathlib import Path


    tol = case.tolerance("onnx.scores")
    rec = CheckRecord.new("onnx.scores", "onnx", case.model, tol,
                          notes=f"policy {ONNX_POLICY}; exported with lightning_port.export.export_onnx")
    try:
        from lightning_port import export as X
    except ImportError as e:
        from ..report import not_covered

        return [not_covered("onnx", case.model, f"lightning_port.export not importable: {e}")]
    from .. import strategies as S

    kw = _named_kwargs(case)
    config = S.ModelConfig(kw, case.config_id)
    try:
        pair = make_pair(case, config, 7, moe_eval_policy=ONNX_POLICY, mutate=ctx.mutate)
        with tempfile.TemporaryDirectory() as d:
            path, _ = X.export_onnx(pair.port, Path(d) / "m.onnx", moe_eval_policy=ONNX_POLICY)
            sess = X.ort_session(path)

            def body(data):
                b = data.draw(case.inputs(config), label="batch")
                ort = _run_ort(X, sess, b, case.kind)
                eager = run_eval(pair.port, b, case.kind, 0)
                return {"onnx.scores": compare({"scores": ort["scores"]}, {"scores": eager["scores"]}, tol,
                                               context={"config": config.kwargs, "batch": b.recipe})}

            run_property({"onnx.scores": rec}, ctx, case, 1.0, body)
    except Exception as e:
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return [rec]


def _run_ort(X, sess, batch, kind: str) -> dict:
    """The ONNX Runtime session's outputs on a drawn batch (inputs named as the export names them)."""
    from ..fixtures import DUAL_ARGS, DUAL_KWARGS, SINGLE_ARGS, SINGLE_KWARGS
    from ..pairs import forward_inputs

    names = (SINGLE_ARGS + SINGLE_KWARGS) if kind == "single" else (DUAL_ARGS + DUAL_KWARGS)
    args, kwargs = forward_inputs(batch, kind)
    return X.run_onnx(sess, dict(zip(names, (*args, *kwargs.values()))))


def _named_kwargs(case: ParityCase) -> dict:
    """The case's named configuration as constructor kwargs (the dual model takes no ``use_mlp``)."""
    from ..cases import NAMED_CONFIGS

    kw = dict(NAMED_CONFIGS["tiny-dual" if case.model == "dual:tiny" else case.config_id])
    if case.kind == "dual":
        kw.pop("use_mlp", None)
    return kw


def check_onnx_int8(case: ParityCase, ctx: RunContext) -> list[CheckRecord]:
    """onnxruntime running the int8 export (``quantize="int8"``, weight matmuls >= :data:`INT8_MIN_WIDTH`
    wide) vs the fp32 eager port: ``probs`` on hypothesis-drawn batches, held to the int8 tolerance.
    MoE configurations run with MoE off (:data:`INT8_MOE_NOTE`)."""
    import tempfile
    from pathlib import Path

    import torch


    tol = case.tolerance("onnx.int8_probs")
    rec = CheckRecord.new("onnx.int8_probs", "onnx", case.model, tol,
                          notes=f"policy {ONNX_POLICY}; int8 export (matmuls >= {INT8_MIN_WIDTH} wide) vs the fp32 "
                                "eager port, probs")
    try:
        from lightning_port import export as X
    except ImportError as e:
        from ..report import not_covered

        return [not_covered("onnx", case.model, f"lightning_port.export not importable: {e}")]
    from .. import strategies as S

    kw = _named_kwargs(case)
    if kw.get("use_moe"):
        kw["use_moe"] = False
        rec.notes += "; " + INT8_MOE_NOTE
    config = S.ModelConfig(kw, case.config_id)
    try:
        pair = make_pair(case, config, 7, moe_eval_policy=ONNX_POLICY, mutate=ctx.mutate)
        with tempfile.TemporaryDirectory() as d:
            path, _ = X.export_onnx(pair.port, Path(d) / "m.onnx", moe_eval_policy=ONNX_POLICY, quantize="int8",
                                    int8_min_width=INT8_MIN_WIDTH, deviation_rows=256)
            meta = X.read_metadata(path)
            if int(meta.get("int8_quantized_matmuls", "0")) == 0:
                raise AssertionError("the int8 export quantized no matmul: nothing to check")
            rec.notes += f"; {meta['int8_quantized_matmuls']} matmuls quantized"
            sess = X.ort_session(path, metadata=meta)

            def body(data):
                b = data.draw(case.inputs(config), label="batch")
                ort = _run_ort(X, sess, b, case.kind)
                eager = torch.softmax(run_eval(pair.port, b, case.kind, 0)["scores"], dim=1)
                return {"onnx.int8_probs": compare({"probs": ort["probs"]}, {"probs": eager}, tol,
                                                   context={"config": config.kwargs, "batch": b.recipe})}

            run_property({"onnx.int8_probs": rec}, ctx, case, 1.0, body)
    except Exception as e:
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return [rec]
