"""``tsa-score``: score a split in the legacy numpy layout with an exported ONNX model (ONNX Runtime)
or a port checkpoint (eager), and write the legacy score files.

``tsa-score MODEL.onnx|CKPT --data-dir D --split vali --out DIR`` writes, as the legacy loop did
(formats in :mod:`lightning_port.legacy_files`):

- ``vali``: ``score_file.csv`` (softmax[:, -1], one ``str(np.float32(v))`` per line) and ``tag_file.csv``;
- ``cali``: ``cali_score_file.csv``, ``cali_tag_file.csv`` and ``percentile_score.pkl``;
- any other split ``S``: ``S_score_file.csv`` and ``S_tag_file.csv``.

Rows are scored in file order in batches of ``--batch-size`` (ONNX models have a dynamic batch
axis; ``--batch-size 1`` reproduces the online handler exactly, since with MoE a row's score
depends on the rows sharing its batch unless the model was trained/exported ``batch_invariant``).
Eager scoring uses the checkpoint's ``moe_eval_policy`` unless ``--moe-eval-policy`` names another.

``--precision bf16`` (checkpoints only): eager scoring under ``torch.autocast(bfloat16)`` (about 1.4x the fp32
eager speed on an AVX-512 bf16 CPU; benchmarks/bench_cpu_bf16.py). The first batch is also scored in fp32; the
measured deviation (max and 99.9th percentile of |Δprob|) is printed and written to ``score_precision.json``, and
a deviation beyond :data:`lightning_port.tolerances.EAGER_BF16` (2e-2, int8's bound) refuses the run before any
score file is written.

The legacy endpoint's post-processing (:mod:`lightning_port.serving.calibration`): ``tsa-score
--percentiles percentile_score.pkl [--calibration bspline_parameters.json]`` writes the percentile and
the calibrated probability, next to the legacy score, to ``endpoint_scores.csv``
(``{split}_endpoint_scores.csv`` for other splits than ``vali``) with the endpoint's JSON keys as header:
``legacy-score,score-percentile,ProbabilityScore``. The legacy score files stay byte-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..legacy_files import output_names
from ..tolerances import EAGER_BF16
from .calibration import (
    BSplineCalibration,
    PercentileTable,
    load_calibration,
    load_percentile_table,
    percentile_score,
    probability_score,
)
from .runtime import (
    DUAL_INPUTS,
    SINGLE_INPUTS,
    ExportError,
    eager_outputs,
    load_checkpoint,
    ort_session,
    run_onnx,
)

__all__ = [
    "DEFAULT_BATCH",
    "ENDPOINT_COLUMNS",
    "ModelInfo",
    "PROG",
    "Scorer",
    "batch_to_inputs",
    "build_parser",
    "deviation_check",
    "eager_scorer",
    "main",
    "onnx_scorer",
    "output_names",
    "score_split",
    "write_endpoint_file",
]

PROG = "tsa-score"
DEFAULT_BATCH = 1024
ENDPOINT_COLUMNS = ("legacy-score", "score-percentile", "ProbabilityScore")  # the endpoint's JSON keys

Scorer = Callable[[Mapping[str, Tensor]], np.ndarray]  # named inputs -> probs (B, C)


class ModelInfo:
    """What the scorer needs to know about a model: its kind and feature counts."""

    def __init__(self, kind: str, hparams: Mapping[str, Any]):
        self.kind = kind
        self.hparams = dict(hparams)

    @property
    def n_engineered(self) -> int:
        return int(self.hparams.get("n_engineered_num_features", 0))


def onnx_scorer(path: str | Path, threads: int = 1) -> tuple[Scorer, ModelInfo]:
    """An ONNX Runtime scorer for an exported file (kind and hyperparameters from its metadata)."""
    from .runtime import read_metadata

    meta = read_metadata(path)
    session = ort_session(path, threads=threads, metadata=meta)
    names = {i.name for i in session.get_inputs()}
    kind = meta.get("kind") or ("dual" if "x_seq_cat_cid" in names else "single")
    hparams = json.loads(meta.get("hyperparameters", "{}"))

    def score(inputs: Mapping[str, Tensor]) -> np.ndarray:
        return run_onnx(session, inputs)["probs"]

    return score, ModelInfo(kind, hparams)


PRECISIONS = ("fp32", "bf16")


def eager_scorer(module: torch.nn.Module, precision: str = "fp32") -> tuple[Scorer, ModelInfo]:
    """An eager scorer for a port LightningModule (eval mode, its own MoE policy); ``precision="bf16"`` runs the
    forward under ``torch.autocast(<module's device>, bfloat16)`` (the softmax in fp32)."""
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    module = module.eval()
    device = next(module.parameters()).device.type

    def score(inputs: Mapping[str, Tensor]) -> np.ndarray:
        if precision == "bf16":
            with torch.autocast(device, dtype=torch.bfloat16):
                return eager_outputs(module, inputs)["probs"]
        return eager_outputs(module, inputs)["probs"]

    return score, ModelInfo(module.kind, module.hparams)


def deviation_check(probs: np.ndarray, reference: np.ndarray, precision: str) -> dict:
    """The deviation of one batch's ``probs`` (the lower-precision scorer's) from the fp32 ``reference``'s,
    against :data:`~lightning_port.tolerances.EAGER_BF16`; raises :class:`ExportError` (one line) beyond it."""
    d = np.abs(probs.astype(np.float64) - reference.astype(np.float64))
    worst = float(d.max()) if d.size else 0.0
    if np.isnan(worst):  # a NaN on one side only, or on both: never within the bound
        worst = float("inf")
    out = {"precision": precision, "rows": int(d.shape[0]), "max_abs_dev": worst,
           "p999_abs_dev": float(np.quantile(d, 0.999)) if d.size and np.isfinite(worst) else worst,
           "bound": EAGER_BF16.atol, "reason": EAGER_BF16.reason}
    if not worst <= EAGER_BF16.atol:
        raise ExportError(f"{precision} scores deviate from fp32 by up to {worst:.3g} on the first {d.shape[0]} rows, "
                          f"beyond the bound {EAGER_BF16.atol:g}; score in fp32")
    return out


def batch_to_inputs(batch: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """A :class:`~lightning_port.data.TSANumpyDataset` batch -> named model inputs (legacy forward names)."""
    from ..module import key_padding_mask

    out: dict[str, Tensor] = {}
    if kind == "single":
        out.update(x_cat=batch["x_seq_cat"], x_num=batch["x_seq_num"], time_seq=batch["time_to_last"],
                   key_padding_mask=key_padding_mask(batch["not_padded"]))
    else:
        for s in ("_cid", "_ccid"):
            out.update({f"x_seq_cat{s}": batch[f"x_seq_cat{s}"], f"x_seq_num{s}": batch[f"x_seq_num{s}"],
                        f"time_seq{s}": batch[f"time_to_last{s}"],
                        f"key_padding_mask{s}": key_padding_mask(batch[f"not_padded{s}"])})
    out["x_engineered"] = batch["x_engineered_num"]
    names = SINGLE_INPUTS if kind == "single" else DUAL_INPUTS
    return {n: out[n] for n in names}


def write_endpoint_file(path: str | Path, scores: np.ndarray, table: PercentileTable | None = None,
                        calibration: BSplineCalibration | None = None) -> Path:
    """CSV with the endpoint's keys as header: ``legacy-score`` (as in ``score_file.csv``), then
    ``score-percentile`` (with a table) and ``ProbabilityScore`` (with a calibration), one row per score,
    the derived values as Python's shortest round-trip ``repr`` of the float64 result."""
    path = Path(path)
    cols = [ENDPOINT_COLUMNS[0]]
    values: list[np.ndarray] = []
    if table is not None:
        cols.append(ENDPOINT_COLUMNS[1])
        values.append(np.atleast_1d(percentile_score(scores, table)))
    if calibration is not None:
        cols.append(ENDPOINT_COLUMNS[2])
        values.append(np.atleast_1d(probability_score(scores, calibration)))
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        for i, v in enumerate(scores):
            f.write(",".join([str(np.float32(v)), *(repr(float(col[i])) for col in values)]) + "\n")
    return path


def score_split(scorer: Scorer, info: ModelInfo, data_dir: str | Path, split: str, out_dir: str | Path,
                *, batch_size: int = DEFAULT_BATCH, version: str = "v0", table: PercentileTable | None = None,
                calibration: BSplineCalibration | None = None, reference: Scorer | None = None,
                precision: str = "fp32") -> dict[str, Path]:
    """Score every row of ``split`` in file order and write the legacy files (and, with ``table`` and/or
    ``calibration``, the endpoint columns file); returns their paths. With ``reference`` (the fp32 scorer of a
    lower-precision ``scorer``), the first batch is scored by both first: :func:`deviation_check`, written to
    ``score_precision.json``."""
    from ..data import SplitDims, TSANumpyDataset, load_split
    from ..legacy_files import write_percentile_table, write_score_file, write_tag_file
    from ..scoring import positive_scores

    hp = info.hparams
    want = SplitDims(n_cat=hp.get("n_cat_features"), n_num=hp.get("n_num_features"),
                     seq_len=hp.get("seq_len"), n_eng=hp.get("n_engineered_num_features"))
    loaded = load_split(data_dir, split, info.kind, version, n_embedding=hp.get("n_embedding"),
                        n_num_features=hp.get("n_num_features"), expected=[(want, "the model")])
    dataset = TSANumpyDataset(loaded, info.kind)
    n = len(dataset)
    probs, labels = [], []
    deviation = None
    for start in range(0, n, batch_size):
        batch = dataset.__getitems__(list(range(start, min(start + batch_size, n))))
        inputs = batch_to_inputs(batch, info.kind)
        out = scorer(inputs)
        if reference is not None and deviation is None:
            deviation = deviation_check(out, reference(inputs), precision)
        probs.append(positive_scores(out))
        labels.append(batch["y"].numpy())
    scores = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    tags = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(split)
    written = {"scores": write_score_file(out_dir / names["scores"], scores),
               "tags": write_tag_file(out_dir / names["tags"], tags)}
    if "percentiles" in names and scores.size:
        written["percentiles"] = write_percentile_table(out_dir / names["percentiles"], scores)
    if table is not None or calibration is not None:
        written["endpoint"] = write_endpoint_file(out_dir / names["endpoint"], scores, table, calibration)
    if deviation is not None:
        path = out_dir / "score_precision.json"
        path.write_text(json.dumps(deviation, indent=1) + "\n")
        written["precision"] = path
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Score a legacy numpy split with an ONNX model "
                                "(ONNX Runtime) or a port checkpoint (eager) and write the legacy score files.")
    p.add_argument("model", help="MODEL.onnx (from tsa-export-onnx) or a port Lightning checkpoint")
    p.add_argument("--data-dir", required=True, help="folder with the legacy {split}_X_..._{version}.npy files")
    p.add_argument("--split", default="vali", help="vali (score_file.csv), cali (cali_*, percentile_score.pkl) or another")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--version", default="v0", help="file version tag (default v0)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"rows per batch (default {DEFAULT_BATCH})")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch intra-op threads (default 1)")
    p.add_argument("--moe-eval-policy", default=None, help="eager only: override the checkpoint's MoE eval policy")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="checkpoints only: bf16 scores under torch.autocast(bfloat16), its deviation from fp32 "
                        "measured on the first batch and held to 2e-2 (score_precision.json)")
    p.add_argument("--percentiles", default=None, metavar="PKL",
                   help="legacy percentile_score.pkl: add the endpoint's score-percentile column "
                        "(written with the legacy score to endpoint_scores.csv)")
    p.add_argument("--calibration", default=None, metavar="JSON",
                   help="bspline_parameters.json (knots, coefficients, degree): add the endpoint's ProbabilityScore")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size must be >= 1, got {args.batch_size}.")
        path = Path(args.model)
        if not path.is_file():
            raise ExportError(f"model {path} does not exist.")
        table = load_percentile_table(args.percentiles) if args.percentiles else None
        calibration = load_calibration(args.calibration) if args.calibration else None
        if path.suffix == ".onnx":
            if args.moe_eval_policy:
                raise ExportError("--moe-eval-policy applies to checkpoints; an ONNX model's policy is fixed "
                                  "at export (see its moe_eval_policy metadata).")
            if args.precision != "fp32":
                raise ExportError("--precision bf16 applies to checkpoints (eager scoring); an ONNX model is scored "
                                  "in the precision it was exported in (fp32, or int8 with --quantize).")
            scorer, info = onnx_scorer(path, threads=args.threads)
            reference, engine = None, "onnxruntime"
        else:
            torch.set_num_threads(args.threads)
            overrides = {"moe_eval_policy": args.moe_eval_policy} if args.moe_eval_policy else {}
            module = load_checkpoint(path, **overrides)
            scorer, info = eager_scorer(module, args.precision)
            reference = eager_scorer(module)[0] if args.precision != "fp32" else None
            engine = "eager" if args.precision == "fp32" else f"eager {args.precision}"
        written = score_split(scorer, info, args.data_dir, args.split, args.out, batch_size=args.batch_size,
                              version=args.version, table=table, calibration=calibration,
                              reference=reference, precision=args.precision)
    except (ExportError, ValueError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    n = len(written["scores"].read_text().splitlines())
    dev = ""
    if "precision" in written:
        d = json.loads(written["precision"].read_text())
        dev = f"; {d['precision']} vs fp32 on the first {d['rows']} rows: max |Δprob| {d['max_abs_dev']:.2e} (bound {d['bound']:g})"
    print(f"scored {n} rows of {args.split} ({info.kind}, {engine}, batch {args.batch_size}{dev}): "
          + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
