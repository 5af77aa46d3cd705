"""ONNX Runtime plumbing shared by ``tsa-export-onnx`` and ``tsa-score``: the named inputs and outputs
of an exported TSA graph, a CPU session for an exported file, running it, the eager port on the same named
inputs, the file's metadata, and loading a port checkpoint.

Input names follow the legacy forward arguments (docs/onnx.md): single ``x_cat, x_num, x_engineered,
time_seq, key_padding_mask``; dual ``x_seq_cat_cid, x_seq_num_cid, time_seq_cid, x_seq_cat_ccid,
x_seq_num_ccid, time_seq_ccid, x_engineered, key_padding_mask_cid, key_padding_mask_ccid``
(``x_engineered`` only when the model has engineered features); outputs ``scores`` and ``probs``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DUAL_INPUTS",
    "OUTPUT_NAMES",
    "SINGLE_INPUTS",
    "ExportError",
    "eager_outputs",
    "input_names",
    "load_checkpoint",
    "module_kind",
    "ort_session",
    "read_metadata",
    "run_onnx",
]

OUTPUT_NAMES = ("scores", "probs")
SINGLE_INPUTS = ("x_cat", "x_num", "x_engineered", "time_seq", "key_padding_mask")
DUAL_INPUTS = ("x_seq_cat_cid", "x_seq_num_cid", "time_seq_cid", "x_seq_cat_ccid", "x_seq_num_ccid",
               "time_seq_ccid", "x_engineered", "key_padding_mask_cid", "key_padding_mask_ccid")


class ExportError(Exception):
    """A user error (missing file, bad policy, not a port checkpoint): one line, no traceback."""


# --- modules --------------------------------------------------------------------------------------
def module_kind(module: nn.Module) -> str:
    kind = getattr(module, "kind", "")
    if kind not in ("single", "dual"):
        raise ExportError(f"{type(module).__name__} is not a TSA port module (kind {kind!r}).")
    return kind


def input_names(kind: str, n_engineered: int) -> tuple[str, ...]:
    """ONNX input names for ``kind``; ``x_engineered`` only when there are engineered features."""
    names = SINGLE_INPUTS if kind == "single" else DUAL_INPUTS
    return tuple(n for n in names if n != "x_engineered" or n_engineered > 0)


# --- exported files ---------------------------------------------------------------------------------
def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an exported file (without loading the weights into a session)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


# --- ONNX Runtime -----------------------------------------------------------------------------------
def ort_session(path: str | Path, threads: int = 1, metadata: Mapping[str, str] | None = None) -> Any:
    """An ONNX Runtime CPU session (``threads`` intra-op threads, sequential execution).

    A file that ``tsa-export-onnx`` already optimised (metadata ``ort_optimization`` other than ``none``)
    is loaded with ONNX Runtime's optimisations off: they ran at export, and running them again would only
    cost start-up time. Any other file gets ONNX Runtime's default (all optimisations, at load)."""
    import onnxruntime as ort

    meta = read_metadata(path) if metadata is None else metadata
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if meta.get("ort_optimization", "none") in ("basic", "extended", "all"):
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: Mapping[str, Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``session`` on the inputs it declares (others are ignored) -> {output name: array}."""
    feed = {}
    for i in session.get_inputs():
        if i.name not in inputs or inputs[i.name] is None:
            raise ExportError(f"input {i.name!r} is missing (the model expects "
                              f"{', '.join(x.name for x in session.get_inputs())}).")
        v = inputs[i.name]
        feed[i.name] = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
    outs = session.run(None, feed)
    return {o.name: v for o, v in zip(session.get_outputs(), outs)}


def eager_outputs(module: nn.Module, inputs: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """The eager LightningModule's ``scores`` and ``probs`` on named inputs (legacy forward order)."""
    kind = module_kind(module)
    names = SINGLE_INPUTS if kind == "single" else DUAL_INPUTS
    x = {n: inputs.get(n) for n in names}
    with torch.no_grad():
        if kind == "single":
            scores, _ = module(x["x_cat"], x["x_num"], x["x_engineered"], x["time_seq"],
                               None, x["key_padding_mask"])
        else:
            scores, _ = module(*(x[n] for n in DUAL_INPUTS[:7]), None, x["key_padding_mask_cid"],
                               x["key_padding_mask_ccid"])
    scores = scores.float()  # under autocast the logits are bf16: the softmax in fp32, as the fp32 path's
    return {"scores": scores.numpy(), "probs": torch.softmax(scores, dim=1).numpy()}


# --- checkpoints and CLI ----------------------------------------------------------------------------
def load_checkpoint(path: str | Path, **overrides: Any) -> nn.Module:
    """The port LightningModule saved in ``path`` (single or dual, read from the checkpoint)."""
    from ..module import DualSequenceTSA, TemporalSelfAttentionClassification

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ExportError(f"cannot read checkpoint {path}: it holds pickled objects that a weights-only "
                          "load refuses (possibly code); not loading it.") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot read checkpoint {path}: {first}.") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ExportError(f"{path} is not a Lightning checkpoint of the TSA port (no state_dict / "
                          "hyper_parameters); convert legacy files with tsa-convert first.")
    dual = any(k.startswith("network.order_cid.") for k in ckpt["state_dict"])
    cls = DualSequenceTSA if dual else TemporalSelfAttentionClassification
    try:
        module = cls.load_from_checkpoint(str(path), map_location="cpu", **overrides)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ExportError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
    return module.eval()
