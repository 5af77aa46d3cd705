"""The model behind the endpoint: which weights of the model folder are used, and the two scorers.

Weights (legacy-endpoint.md §9; docs/serving.md "What model_fn loads"):

- ``isSmall_0_OrderFeature.pt`` (``handler.model_file``): the legacy state_dict, read with
  ``torch.load(weights_only=True)`` (:func:`lightning_port.convert.load_file`), mapped by the one weight map
  (:mod:`lightning_port.weight_map`) into the port network built with the handler's constants;
- a port checkpoint ``*.ckpt`` (Lightning, ``weights_only``): wins over the legacy ``.pt`` when both are there;
- an exported ``*.onnx`` (``tsa-export-onnx``): the ONNX backend serves it as it is when there is one.

``backend="onnx"`` (default): the folder's ``.onnx`` file, else the model above exported once with
:func:`lightning_port.export.export_onnx` to a cache (``$TSA_SERVE_CACHE``, else ``~/.cache/tsa-serve``; keyed by
the weights' sha256 and the torch / ONNX Runtime versions; ~15 s on 2 cores, then reused) and checked
against the eager port before use. ``backend="eager"``: the port network itself.

Both scorers return the logits; the score is ``torch.softmax(logits[i], dim=0)[1]`` of each row as the
legacy computed it (:func:`positive_scores`), widened exactly to a Python float.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import ArtifactError, FeatureLists

logger = logging.getLogger("lightning_port.serving")

BACKENDS = ("onnx", "eager")
INPUTS = ("x_cat", "x_num", "x_engineered", "time_seq", "key_padding_mask")
CACHE_ENV = "TSA_SERVE_CACHE"
SERVING_POLICY = "expected"  # MoE models only: the export default, deterministic (docs/onnx.md)
# ONNX Runtime and the eager network (the legacy's operations) agree to fp32 rounding while every float input of a
# row stays below this magnitude. Beyond ~1e19 (sqrt of float32's max) the legacy's LayerNorm variance overflows and
# the legacy (and eager) answer NaN where ORT's fused LayerNormalization stays finite (measured on the recorded
# model: equal to 4e-7 up to 1e18 in x_num / x_engineered, NaN vs finite from 1e20); 1e12 leaves a 1e6-fold
# margin for the first projections' gain. Rows beyond it (or with NaN / inf) are scored by the eager network.
EXACT_DOMAIN = 1e12
FLOAT_INPUTS = ("x_num", "x_engineered", "time_seq")


def positive_scores(logits: np.ndarray) -> list[float]:
    """The legacy score of every row: ``torch.softmax(row, dim=0)[1]`` on the float32 logits (legacy:
    ``softmax(logits[0])[1]`` at batch 1), as Python floats (float32 widened)."""
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return [float(torch.softmax(t[i], dim=0)[1]) for i in range(t.shape[0])]


@dataclass
class WeightChoice:
    kind: str  # "onnx" | "ckpt" | "legacy"
    path: Path
    note: str


def _candidates(model_dir: Path, features: FeatureLists) -> tuple[list[Path], list[Path], Path | None]:
    onnx = sorted(p for p in model_dir.glob("*.onnx") if p.is_file())
    ckpt = sorted(p for p in model_dir.glob("*.ckpt") if p.is_file())
    legacy = model_dir / features.model_file
    return onnx, ckpt, (legacy if legacy.is_file() else None)


def _one(paths: list[Path], what: str, model_dir: Path) -> Path | None:
    if len(paths) > 1:
        raise ArtifactError(f"model folder {model_dir}: {len(paths)} {what} files ({', '.join(p.name for p in paths)}); "
                            "keep one (which one to serve would be a guess)")
    return paths[0] if paths else None


def choose_weights(model_dir: Path, features: FeatureLists, backend: str) -> WeightChoice:
    """Which file the backend serves (docs/serving.md): onnx -> the folder's .onnx, else the module's; the
    module -> the .ckpt, else the legacy .pt."""
    onnx, ckpt, legacy = _candidates(model_dir, features)
    if backend == "onnx":
        found = _one(onnx, "ONNX", model_dir)
        if found is not None:
            return WeightChoice("onnx", found, f"{found.name} (ONNX file in the folder)")
    found = _one(ckpt, "checkpoint (.ckpt)", model_dir)
    if found is not None:
        note = f"{found.name} (port checkpoint" + (f"; {legacy.name} not used)" if legacy else ")")
        return WeightChoice("ckpt", found, note)
    if legacy is not None:
        return WeightChoice("legacy", legacy, f"{legacy.name} (legacy state_dict)")
    raise ArtifactError(f"model folder {model_dir}: no weights (expected {features.model_file}, a port .ckpt"
                        + (" or an .onnx file" if backend == "onnx" else "") + ")")


def _check_dims(hp: Mapping[str, Any], features: FeatureLists, source: str) -> None:
    args = features.model_args
    for key in ("n_cat_features", "n_num_features", "n_engineered_num_features", "seq_len", "n_embedding"):
        if key in hp and int(hp[key]) != int(args[key]):
            raise ArtifactError(f"{source}: {key} is {hp[key]}, but the feature lists / handler constants give "
                                f"{args[key]}")


def load_module(choice: WeightChoice, features: FeatureLists) -> torch.nn.Module:
    """The port LightningModule (eval, deterministic and batch-invariant if it has MoE layers)."""
    from .. import convert, weight_map
    from ..module import TemporalSelfAttentionClassification
    from . import export

    if choice.kind == "ckpt":
        try:
            module = export.load_checkpoint(choice.path)
        except export.ExportError as exc:
            raise ArtifactError(str(exc)) from None
        if getattr(module, "kind", "") != "single":
            raise ArtifactError(f"{choice.path}: a {module.kind} model; the endpoint serves the single-sequence "
                                "model of the legacy handler")
        _check_dims(module.hparams, features, str(choice.path))
    else:
        try:
            obj = convert.load_file(choice.path)
            sd, _, _ = convert.split_legacy(obj, str(choice.path))
        except convert.ConvertError as exc:
            raise ArtifactError(str(exc)) from None
        bad = convert.nonfinite_keys(sd)
        if bad:
            raise ArtifactError(f"{choice.path}: non-finite weights (NaN/inf) in {', '.join(bad[:5])}; every score "
                                "would be NaN")
        args = {k: v for k, v in features.model_args.items()}
        with torch.random.fork_rng(devices=[]):
            try:
                module = TemporalSelfAttentionClassification(**args)
            except (TypeError, ValueError) as exc:
                raise ArtifactError(f"{features.source}: handler.model_args: {exc}") from None
        try:
            port_sd = weight_map.legacy_to_port(sd, module.config, "single")
            module.network.load_state_dict(port_sd, strict=True)
        except (weight_map.WeightMapError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ArtifactError(f"{choice.path}: does not fit the handler's model "
                                f"({', '.join(f'{k}={v}' for k, v in args.items() if k.startswith('n_'))}): "
                                f"{first[:400]}") from None
    if module.config.use_moe:
        policy = module.config.moe_eval_policy
        policy = policy if policy != "random" else SERVING_POLICY
        module = export.with_overrides(module, moe_eval_policy=policy, batch_invariant=True)
        logger.info("MoE model: serving with moe_eval_policy=%s, batch_invariant=True (the legacy flipped coins in "
                    "eval; see docs/serving.md)", policy)
    return module.eval()


class EagerScorer:
    """The port network in eval mode (no input validation: NaN inputs give NaN scores, as in the legacy)."""

    name = "eager"
    batch_invariant = True  # tested: a row's logits do not depend on the other rows (tests/test_serving_batching.py)

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.network = module.network.eval()

    def logits(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        t = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.inference_mode():
            scores, _ = self.network(t["x_cat"], t["x_num"], t["x_engineered"], t["time_seq"], None,
                                     t["key_padding_mask"])
        return scores.numpy()


class OrtScorer:
    """An ONNX Runtime session over an exported single-sequence model (its ``scores`` output: the logits)."""

    name = "onnx"

    def __init__(self, path: Path, features: FeatureLists, threads: int = 1):
        from . import export

        try:
            meta = export.read_metadata(path)
            self.session = export.ort_session(path, threads=threads, metadata=meta)
        except Exception as exc:  # noqa: BLE001 - a damaged file or foreign graph: one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"ONNX model {path}: cannot be loaded by ONNX Runtime ({first[:300]})") from None
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(INPUTS) or "scores" not in [o.name for o in self.session.get_outputs()]:
            raise ArtifactError(f"ONNX model {path}: inputs {names}; expected the single-sequence export "
                                f"({', '.join(INPUTS)}) with a 'scores' output (tsa-export-onnx)")
        if meta.get("kind", "single") != "single":
            raise ArtifactError(f"ONNX model {path}: a {meta.get('kind')} model; the endpoint serves the single one")
        hp = json.loads(meta.get("hyperparameters", "{}"))
        _check_dims(hp, features, f"ONNX model {path}")
        self.metadata = meta
        self.path = path
        self.quantized = meta.get("quantization", "none") != "none"
        # MoE graphs couple the rows of a batch through the expert capacity unless exported batch-invariant
        self.batch_invariant = not hp.get("use_moe", False) or bool(hp.get("batch_invariant", False))

    def logits(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["scores"], dict(feed))[0]


def outside_exact_domain(feed: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per row: does any float input hold a value that is not finite or beyond :data:`EXACT_DOMAIN`?"""
    rows = len(feed["x_num"])
    out = np.zeros(rows, dtype=bool)
    for name in FLOAT_INPUTS:
        a = np.abs(feed[name].reshape(rows, -1))
        out |= ~(a <= EXACT_DOMAIN).all(axis=1)  # NaN compares False: counted as outside
    return out


class DomainGuardedScorer:
    """ONNX Runtime for the rows in its exact domain, the eager network for the others, one row a call (so a row's
    answer does not depend on its batch: ORT is measured batch-exact, the eager matmuls are not)."""

    name = "onnx"

    def __init__(self, ort: OrtScorer, eager: EagerScorer):
        self.ort, self.eager = ort, eager
        self.metadata, self.path, self.quantized = ort.metadata, ort.path, ort.quantized
        self.batch_invariant = ort.batch_invariant and eager.batch_invariant
        self.eager_rows = 0  # rows answered by the eager network so far

    def logits(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        out = self.ort.logits(feed)
        outside = outside_exact_domain(feed)
        if outside.any():
            out = np.array(out, copy=True)
            for i in np.flatnonzero(outside):  # one row a call: the eager matmuls round by batch size
                out[i] = self.eager.logits({k: np.ascontiguousarray(v[i:i + 1]) for k, v in feed.items()})[0]
                self.eager_rows += 1
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "tsa-serve"


def exported_onnx(module: torch.nn.Module, choice: WeightChoice, features: FeatureLists) -> Path:
    """The module exported to ONNX once (cached by the weights' sha256 and the versions), verified against
    the eager port; a cache folder that cannot be written falls back to a temporary one."""
    import onnxruntime

    from . import export

    key = hashlib.sha256(json.dumps([_sha256(choice.path), torch.__version__, onnxruntime.__version__,
                                     export._port_version(), dict(module.hparams)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:24]
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / "tsa-serve"):
        target = folder / f"{choice.path.stem}-{key}.onnx"
        if target.is_file():
            logger.info("ONNX: using the cached export %s", target)
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkstemp(dir=folder, suffix=".onnx.partial")[1])
        except OSError:
            continue
        break
    else:
        raise ArtifactError(f"no writable cache folder for the ONNX export (set {CACHE_ENV})")
    started = time.perf_counter()
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir")]  # the exporter's INFO chatter
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        export.export_onnx(module, tmp)
        report = export.verify(tmp, module, batch_sizes=(1, 3))
        if not report.passed:
            raise ArtifactError(f"the ONNX export of {choice.path} does not match the eager port (worst abs err "
                                f"{report.worst.max_abs_err:.2e}); serve with backend='eager'")
        os.replace(tmp, target)
    except export.ExportError as exc:
        raise ArtifactError(f"exporting {choice.path} to ONNX failed: {exc}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        if tmp.exists():
            tmp.unlink()
    logger.info("ONNX: exported %s to %s in %.1f s (verified against the eager port; cached)", choice.path.name,
                target, time.perf_counter() - started)
    return target
