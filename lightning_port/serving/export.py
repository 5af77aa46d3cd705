"""``tsa-export-onnx``: ONNX export of the two TSA LightningModules, verified with ONNX Runtime.

Contract (docs/onnx.md, design.md):

- inputs named like the legacy forward arguments -- single: ``x_cat, x_num, x_engineered,
  time_seq, key_padding_mask``; dual: ``x_seq_cat_cid, x_seq_num_cid, time_seq_cid,
  x_seq_cat_ccid, x_seq_num_ccid, time_seq_ccid, x_engineered, key_padding_mask_cid,
  key_padding_mask_ccid``; ``x_engineered`` only when the model has engineered features. Every
  input has a dynamic batch axis 0; sequence inputs are float32 (B, L, n) / (B, L, 1), key padding
  masks bool (B, L+1), True = ignore (the legacy loop's mask, the dummy slot never masked);
- outputs ``scores`` (B, n_classes) logits -- the legacy forward's first output -- and ``probs``
  (B, n_classes) = softmax(scores), whose last column is what the legacy score files hold;
- ``metadata_props``: ``moe_eval_policy``, ``port_version``, ``hyperparameters`` (JSON of the
  module's hyperparameters, with the exported policy), ``kind``, ``input_names``, ``exporter``,
  ``torch_version``.

The legacy ``"random"`` MoE policy flips coins in eval and cannot be exported; export uses a
deterministic policy (:data:`DEFAULT_POLICY` unless the checkpoint or the caller names another).
Everything batch-dependent -- expert capacity, MoE dispatch positions, the dual model's card rows --
is computed in the graph from the runtime batch: the dual network is exported with
``card_rows="masked"`` (the card stack runs on every row and the kept rows form its MoE group),
which is the legacy row selection with static shapes.

Exporter: ``torch.onnx.export(dynamo=True)`` with a symbolic batch ``Dim`` (the default here). It
either proves the graph valid for every batch size or fails at export time; the TorchScript tracer
(``--exporter torchscript``, deprecated since torch 2.9) records Python integers silently and is
kept only as a fallback. Either way :func:`verify` runs the file in ONNX Runtime against the eager
port at batch sizes the export did not see, including a batch of identical rows that makes the
expert capacity bind.

Optimised for ONNX Runtime (:mod:`lightning_port.serving.optimize`): the saved file is the graph after
exact rewrites and ONNX Runtime's own optimisations at ``optimize`` (default ``extended``), so serving
sessions load it with optimisations off (:func:`lightning_port.serving.runtime.ort_session`); metadata ``ort_optimization``,
``onnxruntime_version``, ``graph_rewrites``. ``quantize="int8"`` (opt-in) quantizes the wide weight
matmuls to int8 (dynamic quantization), measures the deviation of the int8 score from the fp32 port's
on :data:`DEVIATION_ROWS` probe rows and stores it (``int8_max_abs_dev``, ``int8_p999_abs_dev``,
``int8_deviation_rows``); its verification holds ``probs`` to :data:`INT8_ATOL` (docs/onnx.md derives it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import DETERMINISTIC_POLICIES, MOE_EVAL_POLICIES
from ..tolerances import ONNX_FP32, ONNX_INT8, abs_diff, close
from .optimize import DEFAULT_LEVEL, INT8_MIN_WIDTH, OPT_LEVELS, optimize_file
from .runtime import (
    OUTPUT_NAMES,
    ExportError,
    eager_outputs,
    input_names,
    load_checkpoint,
    module_kind,
    ort_session,
    read_metadata,
    run_onnx,
)

__all__ = [
    "Comparison",
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "DEFAULT_POLICY",
    "DEFAULT_RTOL",
    "DEVIATION_BATCH",
    "DEVIATION_ROWS",
    "Deviation",
    "EXPORTERS",
    "EXPORT_BATCH",
    "ExportWrapper",
    "INT8_ATOL",
    "INT8_RTOL",
    "PROBE_TIME_MAX",
    "PROG",
    "QUANTIZATIONS",
    "REPLICATED_BATCH",
    "VERIFY_BATCHES",
    "VerifyReport",
    "build_parser",
    "compare",
    "export_onnx",
    "export_wrapper",
    "int8_deviation",
    "main",
    "optimize_export",
    "probe_inputs",
    "resolve_policy",
    "take_rows",
    "tolerance_for",
    "verify",
    "with_overrides",
]

PROG = "tsa-export-onnx"
# "expected" weights the second expert by its gate times the legacy keep-probability min(1, g2/0.2):
# each MoE layer outputs the mean over its coin flip, so the model stays closest to the legacy's
# average output (measured in docs/onnx.md), and the output is continuous in the gate (no 0.2 cliff
# where fp32 rounding differences between runtimes could flip a decision).
DEFAULT_POLICY = "expected"
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
EXPORT_BATCH = 4  # example batch traced at export; verification uses other sizes
VERIFY_BATCHES = (1, 3, 7)
REPLICATED_BATCH = 24  # identical rows: every row picks the same experts, so capacity binds
# the verification's tolerances, from the port's table (lightning_port.tolerances, reasons there): fp32 files
# against the eager port, and int8 files' ``probs`` against the fp32 eager port
DEFAULT_ATOL, DEFAULT_RTOL = ONNX_FP32.atol, ONNX_FP32.rtol
INT8_ATOL, INT8_RTOL = ONNX_INT8.atol, ONNX_INT8.rtol
QUANTIZATIONS = ("int8",)
DEVIATION_ROWS = 10_000  # probe rows for the int8 deviation: p99.9 is then the 10th largest difference
DEVIATION_BATCH = 500
PROBE_TIME_MAX = 1.0e6  # probe time gaps (the legacy attention overflows above ~8.8e7)


def resolve_policy(requested: str | None, current: str) -> str:
    """The deterministic MoE eval policy to export: ``requested``, else the module's own when it is
    deterministic, else :data:`DEFAULT_POLICY`. ``"random"`` is refused."""
    if requested is not None:
        if requested == "random":
            raise ExportError("moe_eval_policy 'random' flips coins in eval and cannot be exported; "
                              f"choose one of {', '.join(DETERMINISTIC_POLICIES)} (default {DEFAULT_POLICY}).")
        if requested not in MOE_EVAL_POLICIES:
            raise ExportError(f"unknown moe_eval_policy {requested!r}; choose one of "
                              f"{', '.join(DETERMINISTIC_POLICIES)}.")
        return requested
    return current if current in DETERMINISTIC_POLICIES else DEFAULT_POLICY


def with_overrides(module: nn.Module, **overrides: Any) -> nn.Module:
    """A fresh eval-mode copy of a TSA LightningModule rebuilt from its hyperparameters with
    ``overrides`` (e.g. ``moe_eval_policy``, ``card_rows``), carrying the same weights."""
    hparams = {**dict(module.hparams), **overrides}
    with torch.random.fork_rng(devices=[]):  # the throw-away initialisation must not move the caller's RNG
        clone = type(module)(**hparams)
    clone.load_state_dict(module.state_dict())
    return clone.eval()


class ExportWrapper(nn.Module):
    """The plain network with named tensor inputs, returning ``(scores, softmax(scores))``.

    Input validation of the LightningModule (data-dependent Python checks) stays out of the graph.
    """

    def __init__(self, network: nn.Module, kind: str, names: Sequence[str]):
        super().__init__()
        self.network = network
        self.kind = kind
        self.names = tuple(names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        x = dict(zip(self.names, inputs))
        eng = x.get("x_engineered")
        if self.kind == "single":
            scores, _ = self.network(x["x_cat"], x["x_num"], eng, x["time_seq"], None, x["key_padding_mask"])
        else:
            scores, _ = self.network(
                x["x_seq_cat_cid"], x["x_seq_num_cid"], x["time_seq_cid"], x["x_seq_cat_ccid"],
                x["x_seq_num_ccid"], x["time_seq_ccid"], eng, None, x["key_padding_mask_cid"],
                x["key_padding_mask_ccid"])
        return scores, torch.softmax(scores, dim=1)  # (B, C) each


def export_wrapper(module: nn.Module, policy: str) -> ExportWrapper:
    """The graph to export: ``module``'s network under ``policy``; the dual one with
    ``card_rows="masked"`` (static shapes; the kept card rows are a mask, not a subset)."""
    kind = module_kind(module)
    overrides: dict[str, Any] = {"moe_eval_policy": policy}
    if kind == "dual":
        overrides["card_rows"] = "masked"
    clone = with_overrides(module, **overrides)
    names = input_names(kind, clone.config.n_engineered_num_features)
    return ExportWrapper(copy.deepcopy(clone.network).eval(), kind, names).eval()


# --- probe inputs ---------------------------------------------------------------------------------
def _sequence(config: Any, batch: int, g: torch.Generator, lengths: Tensor) -> tuple[Tensor, ...]:
    """Left-padded histories of the given lengths (1..L): ``x_cat`` float codes, ``x_num``,
    ``time_seq`` (0 at the last position, growing into the past), ``key_padding_mask`` (B, L+1)."""
    L, n_cat, n_num = config.seq_len, config.n_cat_features, config.n_num_features
    pos = torch.arange(L)
    not_padded = pos[None, :] >= (L - lengths)[:, None]  # (B, L)
    x_cat = torch.randint(1, config.n_cat_codes + 1, (batch, L, n_cat), generator=g).float()
    x_num = torch.randn(batch, L, n_num, generator=g)
    gaps = torch.rand(batch, L, generator=g) * PROBE_TIME_MAX / L
    time = gaps.flip(1).cumsum(1).flip(1) - gaps[:, -1:]  # (B, L), 0 at the last position
    x_cat = x_cat * not_padded[..., None]
    x_num = x_num * not_padded[..., None]
    time = (time * not_padded)[..., None]  # (B, L, 1)
    kpm = torch.logical_not(torch.nn.functional.pad(not_padded, (0, 1), value=True))  # (B, L+1)
    return x_cat, x_num, time, kpm


def probe_inputs(config: Any, kind: str, batch: int, seed: int = 0) -> dict[str, Tensor]:
    """Synthetic inputs in the legacy layout for ``config``: random history lengths (some full, some
    of length 1); dual: about a third of the card histories empty (only the current order)."""
    g = torch.Generator().manual_seed(seed)
    L = config.seq_len
    out: dict[str, Tensor] = {}

    def lengths() -> Tensor:
        n = torch.randint(1, L + 1, (batch,), generator=g)
        n[torch.rand(batch, generator=g) < 0.2] = L
        return n

    if kind == "single":
        x_cat, x_num, time, kpm = _sequence(config, batch, g, lengths())
        out.update(x_cat=x_cat, x_num=x_num, time_seq=time, key_padding_mask=kpm)
    else:
        for sfx in ("_cid", "_ccid"):
            n = lengths()
            if sfx == "_ccid":
                n[torch.arange(batch) % 3 == 1] = 1  # empty card history: only the current order
            x_cat, x_num, time, kpm = _sequence(config, batch, g, n)
            out.update({f"x_seq_cat{sfx}": x_cat, f"x_seq_num{sfx}": x_num, f"time_seq{sfx}": time,
                        f"key_padding_mask{sfx}": kpm})
        # legacy: both sequences end with the same current transaction
        out["x_seq_cat_ccid"][:, -1] = out["x_seq_cat_cid"][:, -1]
        out["x_seq_num_ccid"][:, -1] = out["x_seq_num_cid"][:, -1]
    if config.n_engineered_num_features > 0:
        out["x_engineered"] = torch.randn(batch, config.n_engineered_num_features, generator=g)
    return out


def take_rows(inputs: Mapping[str, Tensor], rows: Sequence[int] | Tensor) -> dict[str, Tensor]:
    idx = torch.as_tensor(rows, dtype=torch.long)
    return {k: v[idx] for k, v in inputs.items()}


# --- export ---------------------------------------------------------------------------------------
def export_onnx(module: nn.Module, output: str | Path, *, moe_eval_policy: str | None = None,
                opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                example_batch: int = EXPORT_BATCH, optimize: str = DEFAULT_LEVEL,
                quantize: str | None = None, int8_min_width: int = INT8_MIN_WIDTH,
                deviation_rows: int = DEVIATION_ROWS) -> tuple[Path, str]:
    """Export a TSA LightningModule to ``output``; returns ``(path, policy exported)``.

    ``optimize``: ONNX Runtime optimisation level applied offline and saved (``none`` keeps the plain
    graph that any ONNX runtime can run). ``quantize="int8"``: dynamic int8 quantization of the weight
    matmuls at least ``int8_min_width`` wide; the deviation from the fp32 port is then measured on
    ``deviation_rows`` probe rows and stored in the metadata (see :func:`int8_deviation`).
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}.")
    if optimize not in OPT_LEVELS:
        raise ExportError(f"unknown optimization level {optimize!r}; choose one of {', '.join(OPT_LEVELS)}.")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    if quantize is not None and deviation_rows < 1:
        raise ExportError(f"deviation_rows must be >= 1, got {deviation_rows}.")
    kind = module_kind(module)
    policy = resolve_policy(moe_eval_policy, module.hparams.get("moe_eval_policy", "random"))
    wrapper = export_wrapper(module, policy)
    names = wrapper.names
    example = probe_inputs(wrapper.network.config, kind, example_batch, seed=12345)
    args = tuple(example[n] for n in names)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" registration notes
    with warnings.catch_warnings(), torch.no_grad(), _restore_level(onnx_log, level):
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, constant folding notes)
        # a tracer warning means a Python value was frozen into the graph: fail instead
        warnings.simplefilter("error", torch.jit.TracerWarning)
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                wrapper, args, input_names=list(names), output_names=list(OUTPUT_NAMES),
                dynamic_shapes=(tuple({0: batch} for _ in names),), opset_version=opset, dynamo=True,
                optimize=True, verbose=False, external_data=False)
            model = program.model_proto
        else:
            import io

            import onnx

            buf = io.BytesIO()
            torch.onnx.export(
                wrapper, args, buf, input_names=list(names), output_names=list(OUTPUT_NAMES),
                dynamic_axes={n: {0: "batch"} for n in (*names, *OUTPUT_NAMES)}, opset_version=opset,
                dynamo=False, do_constant_folding=True)
            model = onnx.load_from_string(buf.getvalue())
    hparams = {**dict(module.hparams), "moe_eval_policy": policy}
    if kind == "dual":
        hparams["card_rows"] = "masked"
    _set_metadata(model, {
        "moe_eval_policy": policy,
        "port_version": _port_version(),
        "hyperparameters": json.dumps(hparams, sort_keys=True, default=str),
        "kind": kind,
        "input_names": ",".join(names),
        "output_names": ",".join(OUTPUT_NAMES),
        "exporter": exporter,
        "torch_version": torch.__version__,
    })
    import onnx

    onnx.checker.check_model(model)
    if optimize == "none" and quantize is None:
        onnx.save_model(model, str(output))
        return output, policy
    with tempfile.TemporaryDirectory(prefix="tsa-export-") as tmp:
        raw = Path(tmp) / "exported.onnx"
        onnx.save_model(model, str(raw))
        optimize_export(raw, output, module, policy=policy, optimize=optimize, quantize=quantize,
                        int8_min_width=int8_min_width, deviation_rows=deviation_rows)
    return output, policy


def optimize_export(raw: str | Path, output: str | Path, module: nn.Module, *, policy: str,
                    optimize: str = DEFAULT_LEVEL, quantize: str | None = None,
                    int8_min_width: int = INT8_MIN_WIDTH, deviation_rows: int = DEVIATION_ROWS) -> Path:
    """The offline steps of :func:`export_onnx` on a plain exported file ``raw`` (``optimize="none"``) of
    ``module`` under ``policy``: optimise (and quantize), write ``output`` with the metadata, and for int8
    measure and store the deviation from the fp32 port. One plain export can so give several variants."""
    import onnx
    import onnxruntime

    if optimize not in OPT_LEVELS:
        raise ExportError(f"unknown optimization level {optimize!r}; choose one of {', '.join(OPT_LEVELS)}.")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    output = Path(output)
    try:
        done = optimize_file(raw, output, level=optimize, quantize=quantize, int8_min_width=int8_min_width)
    except Exception as exc:  # noqa: BLE001 - ORT / quantizer failures name the graph, not the user's input
        raise ExportError(f"ONNX Runtime could not optimize the exported graph: "
                          f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                          ) from exc
    optimized = onnx.load(str(output))
    meta = {"ort_optimization": optimize, "onnxruntime_version": onnxruntime.__version__,
            "graph_rewrites": json.dumps(done["rewrites"], sort_keys=True),
            "quantization": quantize or "none"}
    if quantize:
        meta["int8_quantized_matmuls"] = str(len(done["quantized"]))
        meta["int8_min_width"] = str(int8_min_width)
    _set_metadata(optimized, meta)
    onnx.save_model(optimized, str(output))
    if quantize:
        dev = int8_deviation(output, module, policy=policy, rows=deviation_rows)
        _set_metadata(optimized, dev.metadata())
        onnx.save_model(optimized, str(output))
    return output


@contextlib.contextmanager
def _restore_level(logger: logging.Logger, level: int) -> Iterator[None]:
    try:
        yield
    finally:
        logger.setLevel(level)


def _port_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tsa-lightning-migration")
    except PackageNotFoundError:
        return "unknown"


def _set_metadata(model: Any, values: Mapping[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, str(value)
    model.producer_name = "lightning_port.export"
    model.producer_version = _port_version()


# --- verification ------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """ONNX Runtime vs eager on one batch: worst errors over ``scores`` and ``probs``."""

    label: str
    batch: int
    max_abs_err: float
    max_rel_err: float
    worst: str  # "output[row, col]"
    atol: float
    rtol: float
    bad: int = 0  # elements beyond atol + rtol·|eager|
    total: int = 0

    @property
    def passed(self) -> bool:
        return self.bad == 0

    def line(self) -> str:
        status = "ok" if self.passed else f"FAIL ({self.bad}/{self.total} elements beyond tolerance)"
        return (f"{self.label:<22} batch {self.batch:>3}: max abs err {self.max_abs_err:.2e} "
                f"(at {self.worst}), max rel err {self.max_rel_err:.2e}  {status}")


def compare(onnx_out: Mapping[str, np.ndarray], eager_out: Mapping[str, np.ndarray], label: str,
            atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
            outputs: Sequence[str] = OUTPUT_NAMES) -> Comparison:
    """Elementwise ``|onnx - eager| <= atol + rtol·|eager|`` over ``outputs`` (the rule of
    :mod:`lightning_port.tolerances`: NaN on both sides agrees, NaN or inf on one side fails)."""
    worst_abs, worst_rel, where, bad, total, batch = -1.0, 0.0, "-", 0, 0, 0
    for name in outputs:
        a = np.asarray(onnx_out[name], dtype=np.float64)
        b = np.asarray(eager_out[name], dtype=np.float64)
        if a.shape != b.shape:
            raise AssertionError(f"{label}: {name} has shape {a.shape} in ONNX Runtime, {b.shape} eager")
        batch = a.shape[0]
        diff = abs_diff(a, b)
        rel = diff / np.maximum(np.abs(b), 1e-30)
        bad += int((~close(a, b, rtol, atol)).sum())
        total += a.size
        if a.size and diff.max() > worst_abs:
            i = np.unravel_index(int(np.argmax(diff)), diff.shape)
            worst_abs, where = float(diff[i]), f"{name}[{', '.join(map(str, i))}]"
        if a.size:
            worst_rel = max(worst_rel, float(rel.max()))
    return Comparison(label, batch, max(worst_abs, 0.0), worst_rel, where, atol, rtol, bad, total)


@dataclass
class VerifyReport:
    comparisons: list[Comparison] = field(default_factory=list)
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    outputs: tuple[str, ...] = OUTPUT_NAMES

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def worst(self) -> Comparison:
        return max(self.comparisons, key=lambda c: c.max_abs_err)


def tolerance_for(metadata: Mapping[str, str]) -> tuple[float, float, tuple[str, ...]]:
    """``(atol, rtol, outputs compared)`` for a file: :data:`lightning_port.tolerances.ONNX_FP32` for fp32
    graphs, :data:`lightning_port.tolerances.ONNX_INT8` on ``probs`` for int8 ones."""
    if metadata.get("quantization", "none") == "int8":
        return INT8_ATOL, INT8_RTOL, ("probs",)
    return DEFAULT_ATOL, DEFAULT_RTOL, OUTPUT_NAMES


def verify(onnx_path: str | Path, module: nn.Module, *, policy: str | None = None,
           batch_sizes: Sequence[int] = VERIFY_BATCHES, replicated: int = REPLICATED_BATCH,
           inputs: Mapping[str, Tensor] | None = None, atol: float | None = None,
           rtol: float | None = None, seed: int = 0, session: Any = None) -> VerifyReport:
    """ONNX Runtime vs the eager port (same deterministic policy, the module's own ``card_rows``).

    Batches: probe inputs (or rows of ``inputs``) of each size in ``batch_sizes``, and a batch of
    ``replicated`` copies of one row (with MoE every row then picks the same experts, so the
    runtime expert capacity decides which rows keep them -- a capacity frozen at export shows here).
    Tolerances default to :func:`tolerance_for` the file (int8 files: ``probs`` within :data:`INT8_ATOL`).
    """
    kind = module_kind(module)
    meta = read_metadata(onnx_path)
    if policy is None:
        policy = meta.get("moe_eval_policy", DEFAULT_POLICY)
    default_atol, default_rtol, outputs = tolerance_for(meta)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    reference = with_overrides(module, moe_eval_policy=policy)
    session = session or ort_session(onnx_path, metadata=meta)
    report = VerifyReport(atol=atol, rtol=rtol, outputs=outputs)
    batches: list[tuple[str, dict[str, Tensor]]] = []
    for b in batch_sizes:
        if inputs is None:
            batches.append(("probe", probe_inputs(reference.config, kind, b, seed=seed + b)))
        else:
            n = next(iter(inputs.values())).shape[0]
            batches.append(("fixture rows", take_rows(inputs, [i % n for i in range(b)])))
    if replicated:
        src = inputs if inputs is not None else probe_inputs(reference.config, kind, 2, seed=seed)
        batches.append(("replicated row", take_rows(src, [0] * replicated)))
    for label, x in batches:
        report.comparisons.append(compare(run_onnx(session, x), eager_outputs(reference, x), label,
                                          atol, rtol, outputs))
    return report


@dataclass
class Deviation:
    """How far an int8 file's score (``probs[:, -1]``) is from the fp32 port's, over ``rows`` probe rows."""

    rows: int
    max_abs: float
    p999_abs: float  # 99.9th percentile of |Δscore| (numpy's linear interpolation)
    mean_abs: float

    def metadata(self) -> dict[str, str]:
        return {"int8_max_abs_dev": f"{self.max_abs:.6g}", "int8_p999_abs_dev": f"{self.p999_abs:.6g}",
                "int8_mean_abs_dev": f"{self.mean_abs:.6g}", "int8_deviation_rows": str(self.rows)}

    def line(self) -> str:
        return (f"int8 deviation from the fp32 port over {self.rows} probe rows: max |Δscore| {self.max_abs:.2e}, "
                f"p99.9 {self.p999_abs:.2e}, mean {self.mean_abs:.2e}")


def int8_deviation(onnx_path: str | Path, module: nn.Module, *, policy: str | None = None,
                   rows: int = DEVIATION_ROWS, batch: int = DEVIATION_BATCH, seed: int = 101,
                   inputs: Mapping[str, Tensor] | None = None) -> Deviation:
    """|score(ONNX file) − score(eager fp32 port)| over ``rows`` probe rows (or the rows of ``inputs``),
    scored in batches of ``batch`` (the same batches on both sides: with MoE a row's score depends on
    its batch). Score = ``probs[:, -1]``, the legacy score."""
    kind = module_kind(module)
    meta = read_metadata(onnx_path)
    reference = with_overrides(module, moe_eval_policy=policy or meta.get("moe_eval_policy", DEFAULT_POLICY))
    session = ort_session(onnx_path, threads=max(1, torch.get_num_threads()), metadata=meta)
    n = rows if inputs is None else next(iter(inputs.values())).shape[0]
    diffs = []
    for i, start in enumerate(range(0, n, batch)):
        b = min(batch, n - start)
        x = (probe_inputs(reference.config, kind, b, seed=seed + i) if inputs is None
             else take_rows(inputs, list(range(start, start + b))))
        ours = run_onnx(session, x)["probs"][:, -1].astype(np.float64)
        theirs = eager_outputs(reference, x)["probs"][:, -1].astype(np.float64)
        diffs.append(np.abs(ours - theirs))
    d = np.concatenate(diffs)
    return Deviation(int(d.size), float(d.max()), float(np.quantile(d, 0.999)), float(d.mean()))


# --- CLI ---------------------------------------------------------------------------------------------
def _batch_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Export a TSA port checkpoint to ONNX (dynamic batch, deterministic MoE) "
                               "and verify it with ONNX Runtime against the eager port.")
    p.add_argument("checkpoint", help="Lightning checkpoint of TemporalSelfAttentionClassification or DualSequenceTSA")
    p.add_argument("--output", "-o", required=True, help="path of the .onnx file to write")
    p.add_argument("--moe-eval-policy", default=None,
                   help=f"deterministic MoE policy: {', '.join(DETERMINISTIC_POLICIES)} (default: the "
                        f"checkpoint's if deterministic, else {DEFAULT_POLICY}); 'random' is refused")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch.onnx exporter (default dynamo; torchscript is the deprecated tracer)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare ONNX Runtime with the eager port after export (default on)")
    p.add_argument("--batch-sizes", type=_batch_list, default=VERIFY_BATCHES,
                   help=f"verification batch sizes (default {','.join(map(str, VERIFY_BATCHES))}; export uses {EXPORT_BATCH})")
    p.add_argument("--atol", type=float, default=None,
                   help=f"absolute tolerance (default {DEFAULT_ATOL:g}; int8: {INT8_ATOL:g} on probs)")
    p.add_argument("--rtol", type=float, default=None,
                   help=f"relative tolerance (default {DEFAULT_RTOL:g}; int8: {INT8_RTOL:g})")
    p.add_argument("--optimize", choices=OPT_LEVELS, default=DEFAULT_LEVEL,
                   help=f"ONNX Runtime graph optimisation applied at export and saved (default {DEFAULT_LEVEL}; "
                        "none: the plain ONNX graph, for runtimes other than ONNX Runtime)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="int8: dynamic int8 quantization of the wide weight matmuls (opt-in; see docs/onnx.md)")
    p.add_argument("--int8-min-width", type=int, default=INT8_MIN_WIDTH,
                   help=f"int8: quantize matmuls whose weight is at least this wide on both sides (default {INT8_MIN_WIDTH})")
    p.add_argument("--deviation-rows", type=int, default=DEVIATION_ROWS,
                   help=f"int8: probe rows on which the deviation from the fp32 port is measured (default {DEVIATION_ROWS})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.moe_eval_policy is not None:
            resolve_policy(args.moe_eval_policy, "random")  # refuse before loading anything
        if args.int8_min_width < 1:
            raise ExportError(f"--int8-min-width must be >= 1, got {args.int8_min_width}.")
        module = load_checkpoint(args.checkpoint)
        saved = module.hparams.get("moe_eval_policy", "random")
        path, policy = export_onnx(module, args.output, moe_eval_policy=args.moe_eval_policy,
                                   opset=args.opset, exporter=args.exporter, optimize=args.optimize,
                                   quantize=args.quantize, int8_min_width=args.int8_min_width,
                                   deviation_rows=args.deviation_rows)
    except ExportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    moe = "MoE" if module.config.use_moe else "no MoE"
    if not module.config.use_moe:
        note = " (no MoE layers: the policy has no effect)"
    elif args.moe_eval_policy or saved == policy:
        note = ""
    else:
        note = f" (checkpoint policy {saved!r} is not exportable)"
    meta = read_metadata(path)
    graph = f"ORT {args.optimize}" if args.optimize != "none" else "plain graph"
    if args.quantize:
        graph += f", int8 ({meta.get('int8_quantized_matmuls', '0')} matmuls)"
    print(f"exported {module_kind(module)} model ({moe}) to {path} [{args.exporter}, opset {args.opset}, "
          f"moe_eval_policy={policy}{note}; {graph}]")
    if args.quantize:
        print(f"int8 deviation from the fp32 port over {meta['int8_deviation_rows']} probe rows: max |Δscore| "
              f"{float(meta['int8_max_abs_dev']):.2e}, p99.9 {float(meta['int8_p999_abs_dev']):.2e} "
              "(stored in the model's metadata)")
        if module.config.use_moe:
            print("warning: MoE model: int8 noise changes the experts of some rows (top-2 routing is discontinuous); "
                  "their scores can move by more than the probe rows show (6.8e-02 at the legacy default shape): "
                  "int8 is not recommended for MoE models (docs/onnx.md, 'When int8 is safe')")
        elif float(meta["int8_max_abs_dev"]) > INT8_ATOL:
            print(f"warning: the int8 deviation exceeds the int8 tolerance {INT8_ATOL:g}; serve the fp32 file "
                  "(docs/onnx.md, 'When int8 is safe')")
    if not args.verify:
        return 0
    report = verify(path, module, policy=policy, batch_sizes=args.batch_sizes, atol=args.atol, rtol=args.rtol)
    for c in report.comparisons:
        print("  " + c.line())
    w = report.worst
    verdict = "passed" if report.passed else "FAILED"
    print(f"verification {verdict}: worst abs err {w.max_abs_err:.2e} ({w.label}, batch {w.batch}); "
          f"tolerance atol {report.atol:g} + rtol {report.rtol:g} on {', '.join(report.outputs)}")
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
