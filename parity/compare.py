"""Comparisons that carry a path.

:func:`compare` walks nested outputs (tensors, numbers, numpy arrays, dicts, tuples/lists) and
returns a :class:`Comparison` holding every mismatching leaf as a :class:`Mismatch`: its path
(``scores``, ``grad[order_attention.layer_stack.3.feedforward.experts.w1]``), how many elements
are out of tolerance and their share, the worst absolute and relative differences with the index
where they occur, the tolerance applied, and the context (seed, config, shapes) needed to
reproduce. ``max_rel_err`` is taken over elements with |expected| > atol. NaN is explicit: NaN on both sides at the same place is equal; NaN on one side only,
or inf against a different value, is a mismatch (counted in ``nan_mismatch``).

The elementwise rule is the port's (:func:`lightning_port.tolerances.abs_diff` / ``close``), so the harness,
``tsa-verify`` (:func:`within`, row by row), ``tsa-convert --verify`` and ``tsa-export-onnx`` judge an element
the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_port.tolerances import abs_diff, close

from .tolerances import Tolerance

__all__ = ["Comparison", "Mismatch", "abs_diff", "compare", "from_problems", "within"]


def within(actual: Any, expected: Any, tol: Tolerance) -> np.ndarray:
    """The pass mask of :func:`compare`'s rule, elementwise (bool array): for callers that judge row by row."""
    return close(actual, expected, tol.rtol, tol.atol)


@dataclass
class Mismatch:
    path: str
    reason: str  # "values", "shape", "dtype", "structure", "missing", "unexpected"
    bad: int = 0
    numel: int = 0
    max_abs_err: float = 0.0
    abs_index: tuple[int, ...] | None = None
    max_rel_err: float = 0.0
    rel_index: tuple[int, ...] | None = None
    actual_at_worst: float | None = None
    expected_at_worst: float | None = None
    nan_mismatch: int = 0
    detail: str = ""

    @property
    def share(self) -> float:
        return self.bad / self.numel if self.numel else 1.0

    def describe(self, tol: Tolerance | None = None) -> str:
        if self.reason != "values":
            return f"{self.path}: {self.reason} mismatch: {self.detail}"
        s = (f"{self.path}: {self.bad}/{self.numel} elements ({self.share:.1%}) out of tolerance; "
             f"worst abs err {self.max_abs_err:.3g} at {list(self.abs_index or ())} "
             f"(actual {self.actual_at_worst!r}, expected {self.expected_at_worst!r}); "
             f"worst rel err {self.max_rel_err:.3g} at {list(self.rel_index or ())}")
        if self.nan_mismatch:
            s += f"; {self.nan_mismatch} NaN/inf disagreements"
        if self.detail:
            s += f"; {self.detail}"
        if tol is not None:
            s += f"; allowed atol {tol.atol:g} + rtol {tol.rtol:g}·|expected|"
        return s


@dataclass
class Comparison:
    """The result of comparing one nested output pair."""

    tolerance: Tolerance
    context: dict = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    leaves: int = 0
    worst_path: str = ""

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def merge(self, other: Comparison) -> Comparison:
        self.mismatches += other.mismatches
        self.leaves += other.leaves
        if other.max_abs_err > self.max_abs_err:
            self.max_abs_err, self.worst_path = other.max_abs_err, other.worst_path
        self.max_rel_err = max(self.max_rel_err, other.max_rel_err)
        return self

    def paths(self) -> list[str]:
        return [m.path for m in self.mismatches]

    def report(self) -> str:
        lines = [m.describe(self.tolerance) for m in self.mismatches]
        if self.context:
            lines.append("reproduce with: " + ", ".join(f"{k}={v!r}" for k, v in self.context.items()))
        return "\n".join(lines)


def _to_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray | np.generic):
        return torch.as_tensor(np.asarray(x))
    if isinstance(x, bool | int | float):
        return torch.tensor(x, dtype=torch.float64)
    return None


def _leaf(actual: torch.Tensor, expected: torch.Tensor, path: str, tol: Tolerance, out: Comparison) -> None:
    out.leaves += 1
    if tuple(actual.shape) != tuple(expected.shape):
        out.mismatches.append(Mismatch(path, "shape", detail=f"actual {tuple(actual.shape)} vs expected "
                                                            f"{tuple(expected.shape)}"))
        return
    if actual.dtype.is_floating_point != expected.dtype.is_floating_point and actual.dtype != torch.bool:
        # int vs float is allowed (compared as float64); note nothing
        pass
    a = actual.to(torch.float64).cpu()
    e = expected.to(torch.float64).cpu()
    n = a.numel()
    if n == 0:
        return
    a_np, e_np = a.numpy(), e.numpy()
    diff_f = torch.from_numpy(np.asarray(abs_diff(a_np, e_np)))  # 0 for equal NaNs / infinities, inf for a mismatch
    nan_bad = torch.isinf(diff_f)
    # relative error is reported where |expected| > atol (elsewhere it measures noise around 0)
    rel = diff_f / e.abs()
    rel = torch.where((diff_f == 0) | (e.abs() <= tol.atol) & ~nan_bad, torch.zeros_like(rel), rel)
    rel = torch.nan_to_num(rel, nan=math.inf)
    allowed = tol.atol + tol.rtol * e.abs()
    bad = torch.from_numpy(np.asarray(~close(a_np, e_np, tol.rtol, tol.atol)))
    flat_abs = int(torch.argmax(diff_f))
    flat_rel = int(torch.argmax(rel))
    max_abs, max_rel = float(diff_f.reshape(-1)[flat_abs]), float(rel.reshape(-1)[flat_rel])
    if max_abs > out.max_abs_err or not out.worst_path:
        out.max_abs_err, out.worst_path = max(max_abs, out.max_abs_err), path
    out.max_rel_err = max(out.max_rel_err, max_rel)
    n_bad = int(bad.sum())
    if n_bad:
        # the "worst" reported element is the worst violation of the tolerance
        excess = torch.where(bad, diff_f - allowed, torch.full_like(diff_f, -math.inf))
        flat_v = int(torch.argmax(excess))
        idx = tuple(int(i) for i in np.unravel_index(flat_v, tuple(a.shape))) if a.dim() else ()
        ridx = tuple(int(i) for i in np.unravel_index(flat_rel, tuple(a.shape))) if a.dim() else ()
        out.mismatches.append(Mismatch(
            path, "values", bad=n_bad, numel=n, max_abs_err=max_abs, abs_index=idx, max_rel_err=max_rel,
            rel_index=ridx, actual_at_worst=float(a.reshape(-1)[flat_v]),
            expected_at_worst=float(e.reshape(-1)[flat_v]), nan_mismatch=int(nan_bad.sum())))


def _walk(actual: Any, expected: Any, path: str, tol: Tolerance, out: Comparison) -> None:
    if isinstance(expected, Mapping) or isinstance(actual, Mapping):
        if not (isinstance(expected, Mapping) and isinstance(actual, Mapping)):
            out.mismatches.append(Mismatch(path or "<root>", "structure",
                                           detail=f"{type(actual).__name__} vs {type(expected).__name__}"))
            return
        for k in expected:
            sub = f"{path}[{k}]" if path else str(k)
            if k not in actual:
                out.mismatches.append(Mismatch(sub, "missing", detail="present in expected only"))
            else:
                _walk(actual[k], expected[k], sub, tol, out)
        for k in actual:
            if k not in expected:
                sub = f"{path}[{k}]" if path else str(k)
                out.mismatches.append(Mismatch(sub, "unexpected", detail="present in actual only"))
        return
    ta, te = _to_tensor(actual), _to_tensor(expected)
    if ta is not None and te is not None:
        _leaf(ta, te, path or "<root>", tol, out)
        return
    if actual is None and expected is None:
        return
    if isinstance(expected, Sequence) and isinstance(actual, Sequence) and not isinstance(expected, str):
        if len(actual) != len(expected):
            out.mismatches.append(Mismatch(path or "<root>", "structure",
                                           detail=f"length {len(actual)} vs {len(expected)}"))
            return
        for i, (x, y) in enumerate(zip(actual, expected)):
            _walk(x, y, f"{path}.{i}" if path else str(i), tol, out)
        return
    if actual != expected:
        out.mismatches.append(Mismatch(path or "<root>", "structure", detail=f"{actual!r} vs {expected!r}"))


def compare(actual: Any, expected: Any, tol: Tolerance, path: str = "", context: dict | None = None) -> Comparison:
    """Compare nested ``actual`` against ``expected``; every mismatching leaf is collected."""
    out = Comparison(tolerance=tol, context=dict(context or {}))
    _walk(actual, expected, path, tol, out)
    return out


def from_problems(problems: list[str], tol: Tolerance, path: str = "structure", context: dict | None = None) -> Comparison:
    """A comparison whose mismatches are listed problems (key sets, shapes): one leaf, pass iff none."""
    out = Comparison(tolerance=tol, context=dict(context or {}), leaves=1)
    out.mismatches = [Mismatch(f"{path}", "structure", detail=p) for p in problems]
    return out
