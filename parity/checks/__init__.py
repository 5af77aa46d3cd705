"""The parity properties, one module per claim category, all driven by the case registry.

Each ``check_<category>(case, ctx)`` (or ``check_<category>(ctx)`` for categories that are not per
case) returns :class:`~parity.report.CheckRecord` s. Properties run under hypothesis
(``@given(data=st.data())``, see :mod:`parity.checks.base`); an example's comparisons are added to the
records, and a failing comparison raises :class:`~parity.checks.base.ParityFailure` so hypothesis shrinks
it and the report keeps the (shrunk) reproducer: seed, config and input recipe.

:func:`groups` is the run plan of ``python -m parity``: one :class:`Group` per printed line, in order. A
new category is a new module here plus its lines in :func:`groups` (and its name in
:data:`parity.report.CATEGORIES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..cases import CASES, case
from ..report import CheckRecord
from .base import ParityFailure, RunContext, run_property
from .checkpoint import check_checkpoint
from .convergence import check_convergence
from .endpoint import (
    check_endpoint_port_drawn,
    check_endpoint_port_recorded,
    check_endpoint_reference,
    check_endpoint_reference_drawn,
)
from .fast_path import check_fast_path, check_fast_path_rates, check_fast_path_training
from .forward import check_forward
from .gradient import check_gradient
from .init import check_init
from .loss import check_loss
from .metrics import check_metrics
from .onnxrt import check_onnx, check_onnx_int8
from .precision import (
    VARIANTS,
    check_not_on_this_machine,
    check_precision,
    check_precision_fit,
    check_precision_resume,
    check_precision_training,
)
from .recorded import check_fixtures
from .structure import check_structure
from .training import check_training

__all__ = [
    "Group",
    "ParityFailure",
    "RunContext",
    "check_checkpoint",
    "check_convergence",
    "check_endpoint_port_drawn",
    "check_endpoint_port_recorded",
    "check_endpoint_reference",
    "check_endpoint_reference_drawn",
    "check_fast_path",
    "check_fast_path_rates",
    "check_fast_path_training",
    "check_fixtures",
    "check_forward",
    "check_gradient",
    "check_init",
    "check_loss",
    "check_metrics",
    "check_onnx",
    "check_precision",
    "check_precision_fit",
    "check_precision_resume",
    "check_precision_training",
    "check_onnx_int8",
    "check_structure",
    "check_training",
    "groups",
    "run_property",
]

TRAINING_CASES = ("single:tiny", "single:tiny-plain", "single:drawn", "dual:tiny")
# the precision category: parity.checks.precision.FORWARD_CASES / TRAINING_CASES x VARIANTS
ONNX_CASES = ("single:tiny", "single:tiny-plain", "dual:tiny")
FAST_PATH_CASES = ("single:drawn", "dual:drawn")


@dataclass(frozen=True)
class Group:
    """One line of a parity run: the category it is selected by (``--only``), its label, and the call."""

    category: str
    label: str
    run: Callable[[RunContext], list[CheckRecord]]


def groups() -> list[Group]:
    """The run plan, in order: the per-case categories case by case, then the others."""
    out: list[Group] = []
    for c in CASES:
        for cat, fn in (("structure", check_structure), ("init", check_init), ("forward", check_forward),
                        ("gradient", check_gradient)):
            out.append(Group(cat, f"{cat} {c.model}", partial(fn, c)))
    out.append(Group("fixtures", "recorded fixtures", check_fixtures))
    out.append(Group("loss", "loss", check_loss))
    out += [Group("training", f"training {m}", partial(check_training, case(m))) for m in TRAINING_CASES]
    out.append(Group("metrics", "metrics", check_metrics))
    out += [Group("onnx", f"onnx {m}", partial(check_onnx, case(m))) for m in ONNX_CASES]
    out += [Group("onnx", f"onnx int8 {m}", partial(check_onnx_int8, case(m))) for m in ONNX_CASES]
    out.append(Group("checkpoint", "checkpoint (every legacy file format)", check_checkpoint))
    out += [Group("convergence", f"convergence {kind} (legacy loop vs Trainer.fit to early stopping)",
                  partial(check_convergence, kind)) for kind in ("single", "dual")]
    for m in FAST_PATH_CASES:
        out.append(Group("fast_path", f"fast_path {m}", partial(check_fast_path, case(m))))
        out.append(Group("fast_path", f"fast_path {m.split(':')[0]}:rates (keep rates)",
                         partial(check_fast_path_rates, case(m))))
    for kind in ("single", "dual"):
        out.append(Group("fast_path", f"fast_path {kind}:synth (short training runs)",
                         partial(check_fast_path_training, kind)))
    out += _precision_groups()
    out += [Group("endpoint", "endpoint reference handler vs recorded answers", check_endpoint_reference),
            Group("endpoint", "endpoint reference handler vs the documented contract (drawn requests)",
                  check_endpoint_reference_drawn),
            Group("endpoint", "endpoint port (onnx, eager) vs recorded answers", check_endpoint_port_recorded),
            Group("endpoint", "endpoint port (onnx, eager) vs reference handler (drawn requests)",
                  check_endpoint_port_drawn)]
    return out


def _precision_groups() -> list[Group]:
    from .precision import FORWARD_CASES
    from .precision import TRAINING_CASES as AMP_TRAINING_CASES

    out = []
    for amp in VARIANTS:
        if not amp.available():
            out.append(Group("precision", f"precision {amp.name}: not covered (no GPU)",
                             partial(check_not_on_this_machine, amp)))
            continue
        for m in FORWARD_CASES:
            out.append(Group("precision", f"precision {m} {amp.name} (forward, gradient)",
                             partial(check_precision, case(m), amp)))
        for m in AMP_TRAINING_CASES:
            out.append(Group("precision", f"precision {m} {amp.name} training ({amp.plugin})",
                             partial(check_precision_training, case(m), amp)))
        if amp.scaled:
            out.append(Group("precision", f"precision resume legacy AMP job {amp.name} ({amp.plugin})",
                             partial(check_precision_resume, amp)))
        if amp.device == "cpu" and amp.short == "bf16":  # issue 21: bf16 training offered on the CPU
            for kind in ("single", "dual"):
                out.append(Group("precision", f"precision {kind}:synth {amp.name} short fits (bf16-mixed vs fp32 AUROC)",
                                 partial(check_precision_fit, kind)))
    return out
