"""The SageMaker PyTorch container's handler contract: a drop-in for the legacy ``pytorch_inference_handler.py``.

::

    from lightning_port.serving.inference import model_fn, input_fn, predict_fn, output_fn

    model = model_fn(model_dir)                   # the legacy model folder as it is; ONNX Runtime by default
    model = model_fn(model_dir, backend="eager")  # the eager port instead
    data = input_fn(body, content_type)           # json.loads; ValueError("<ct> not supported by script!")
    prediction = predict_fn(data, model)          # -1 (sanity failure) or the score (float32 widened)
    answer = output_fn(prediction, accept)        # {"predictions": [{"score-percentile", "legacy-score",
                                                  #   "ProbabilityScore"}]}, three strings

Every request answers as the legacy handler did (legacy-endpoint.md §1-§8): the same strings, the same -1
sanity failures, the same exceptions (type and message) for the requests it crashed on. Under the SageMaker
toolkit an exception becomes HTTP 500 with its message, as for the legacy. Like the legacy, ``output_fn``
post-processes with the percentile table and calibration of the model that ``model_fn`` loaded last (one
model per process). Environment (the container calls ``model_fn(model_dir)`` only): ``TSA_SERVE_BACKEND``
(``onnx`` | ``eager``), ``TSA_SERVE_STRICT`` (``1``: strict mode), ``TSA_SERVE_THREADS`` (default 1, as
the legacy's ``torch.set_num_threads(1)``). The differences from the legacy: docs/serving.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import calibration as post
from .artifacts import ArtifactError, ModelFolder, read_model_folder
from .preprocess import (
    INPUTS_ORDER,
    LegacyRequestError,
    ModelInputs,
    RequestPlan,
    SanityFailure,
    StrictRefusal,
    redacted,
)
from .scorers import (
    BACKENDS,
    EXACT_DOMAIN,
    DomainGuardedScorer,
    EagerScorer,
    OrtScorer,
    choose_weights,
    exported_onnx,
    load_module,
    positive_scores,
)

logger = logging.getLogger("lightning_port.serving")

CONTENT_TYPE = "application/json"
ACCEPT = "application/json"
SANITY_FAILURE = -1  # legacy: predict_fn's answer to a request that fails a sanity check


def format_value(v: Any) -> str:
    """legacy-endpoint.md §6.3: ``str(v)``, through numpy's ``format_float_positional`` first when that
    text has an exponent (``1e-05`` -> ``0.00001``)."""
    text = str(v)
    if "e" in text:
        text = str(np.format_float_positional(v))
    return text


class EndpointModel:
    """What ``model_fn`` returns: the validated model folder, the request plan and the scorer."""

    def __init__(self, folder: ModelFolder, scorer: Any, backend: str, strict: bool, source: str):
        self.folder = folder
        self.plan = RequestPlan(folder, strict=strict)
        self.scorer = scorer
        self.backend = backend
        self.strict = bool(strict)
        self.source = source
        self.table = folder.table
        self.calibration = folder.calibration

    # --- the steps ---------------------------------------------------------------------------------
    def parse(self, data: Any) -> ModelInputs | SanityFailure:
        """data_parsing (raises :class:`LegacyRequestError` / :class:`StrictRefusal`)."""
        return self.plan.parse(data)

    def score_many(self, inputs: Sequence[ModelInputs]) -> list[float]:
        """One model call for several parsed requests (a row each) -> their legacy scores."""
        feed = {name: np.stack([getattr(x, attr) for x in inputs]) for name, attr in INPUTS_ORDER}
        return positive_scores(self.scorer.logits(feed))

    def finish(self, score: float) -> float:
        if self.strict and math.isnan(score):
            raise StrictRefusal("strict: the model's score is NaN (the legacy answers score-percentile 0.0, "
                                "which reads as the lowest risk)")
        return score

    def predict(self, data: Any) -> int | float:
        """predict_fn: -1 for a sanity failure, else the score; the legacy's exception otherwise."""
        try:
            parsed = self.parse(data)
        except LegacyRequestError as exc:
            if logger.isEnabledFor(logging.WARNING):
                logger.warning("request refused as the legacy did: %s", redacted(exc))
            raise exc.error from None
        if isinstance(parsed, SanityFailure):
            return SANITY_FAILURE
        return self.finish(self.score_many([parsed])[0])

    def answer(self, prediction: int | float) -> dict[str, list[dict[str, str]]]:
        """output_fn's dict for a prediction (legacy-endpoint.md §6): three strings, keys in the legacy order."""
        pct = post.percentile_score(prediction, self.table)
        prob = post.probability_score(prediction, self.calibration)
        return {"predictions": [{"score-percentile": format_value(pct), "legacy-score": format_value(prediction),
                                 "ProbabilityScore": format_value(prob)}]}

    def describe(self) -> str:
        strict = ", strict" if self.strict else ""
        return f"backend {self.backend}{strict}, weights {self.source}"


_LOADED: EndpointModel | None = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_endpoint(model_dir: str | Path, backend: str | None = None, *, strict: bool | None = None,
                  features: str | Path | None = None, threads: int | None = None) -> EndpointModel:
    """Read and validate the model folder and build the scorer (see :func:`model_fn`)."""
    backend = backend or os.environ.get("TSA_SERVE_BACKEND", "onnx")
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    strict = _env_flag("TSA_SERVE_STRICT") if strict is None else bool(strict)
    threads = int(os.environ.get("TSA_SERVE_THREADS", "1")) if threads is None else int(threads)
    if threads < 1:
        raise ArtifactError(f"threads must be >= 1, got {threads}")
    started = time.perf_counter()
    torch.set_num_threads(threads)  # legacy: model_fn ends with torch.set_num_threads(1)
    folder = read_model_folder(model_dir, features)
    choice = choose_weights(folder.path, folder.features, backend)
    if backend == "onnx":
        module = None
        if choice.kind == "onnx":
            path, source = choice.path, choice.note
            logger.warning("ONNX model %s served alone: a row with an input beyond %.0e answers from ONNX Runtime, "
                           "finite where the legacy answered NaN (docs/divergences.md #20)", path, EXACT_DOMAIN)
        else:
            module = load_module(choice, folder.features)
            path = exported_onnx(module, choice, folder.features)
            source = f"{choice.note}, exported to {path}"
        scorer: Any = OrtScorer(path, folder.features, threads=threads)
        if module is not None:  # rows outside ORT's exact domain: the eager network, as the legacy computed them
            scorer = DomainGuardedScorer(scorer, EagerScorer(module))
        if scorer.quantized:
            logger.warning("ONNX model %s is %s-quantized: legacy-score differs from the fp32 model's beyond "
                           "float32 rounding (docs/onnx.md)", path, scorer.metadata.get("quantization"))
    else:
        scorer = EagerScorer(load_module(choice, folder.features))
        source = choice.note
    model = EndpointModel(folder, scorer, backend, strict, source)
    logger.info("model_fn: %s loaded in %.2f s (%s)", folder.path, time.perf_counter() - started, model.describe())
    return model


# --- the SageMaker handler functions -----------------------------------------------------------------
def model_fn(model_dir: str, backend: str | None = None, *, strict: bool | None = None,
             features: str | Path | None = None, threads: int | None = None) -> EndpointModel:
    """Load the legacy model folder as it is (docs/serving.md "What model_fn loads"): ``backend`` ``"onnx"``
    (default, ``$TSA_SERVE_BACKEND``) or ``"eager"``; ``strict`` (``$TSA_SERVE_STRICT``); ``features``: a
    features.json to use instead of ``model_dir/features.json`` / the packaged lists. Raises
    :class:`~lightning_port.serving.artifacts.ArtifactError` (one line) for a folder it cannot serve."""
    global _LOADED
    model = load_endpoint(model_dir, backend, strict=strict, features=features, threads=threads)
    _LOADED = model
    return model


def input_fn(body: str | bytes, content_type: str | None) -> Any:
    """The legacy input_fn: exactly ``application/json`` (else ``ValueError("<ct> not supported by
    script!")``), parsed with ``json.loads`` (NaN / Infinity literals accepted; ``JSONDecodeError``)."""
    if content_type == CONTENT_TYPE:
        return json.loads(body)
    raise ValueError(f"{content_type} not supported by script!")


def predict_fn(data: Any, model: EndpointModel) -> int | float:
    """The legacy predict_fn: the integer -1 for a sanity failure, else the score (float32 widened); the
    legacy's exception (type and message) for a request it crashed on."""
    return model.predict(data)


def output_fn(prediction: int | float, accept: str | None) -> dict[str, list[dict[str, str]]]:
    """The legacy output_fn: exactly ``application/json`` (else ``ValueError("output format doesn't support
    <accept>")``) -> ``{"predictions": [{"score-percentile", "legacy-score", "ProbabilityScore"}]}``."""
    if accept != ACCEPT:
        raise ValueError(f"output format doesn't support {accept}")
    if _LOADED is None:
        raise RuntimeError("output_fn needs the percentile table and calibration: call model_fn first")
    return _LOADED.answer(prediction)
