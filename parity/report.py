"""Check records and the report writers (``report.json`` and ``report.md``).

Each check in ``report.json`` has ``name``, ``category``, ``model`` (``single:<config id>`` /
``dual:<config id>``), ``max_abs_err``, ``max_rel_err``, ``atol``, ``rtol``, ``examples``,
``passed`` and ``status`` (``passed`` / ``failed`` / ``error`` / ``not covered``), plus the
tolerance reason and, for failures, every mismatch with the path, index and the example to
reproduce. A category nobody has implemented yet appears with status ``not covered`` and
``passed: false`` — never as passed. A check that needs hardware this machine lacks (the CUDA variants of
the ``precision`` category without a GPU) has status ``skipped`` and ``passed: false`` with the reason in
``notes`` ("not covered: no GPU"): never passed, and not a failure of the run.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .compare import Comparison
from .tolerances import Tolerance

CATEGORIES = ("structure", "init", "forward", "gradient", "loss", "training", "metrics", "onnx", "checkpoint",
              "precision", "convergence", "fast_path", "endpoint")
CONVERGENCE_PNG = "convergence_curves.png"
MAX_FAILURE_TEXTS = 5


@dataclass
class CheckRecord:
    name: str
    category: str
    model: str
    atol: float
    rtol: float
    tolerance_reason: str = ""
    examples: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    worst_path: str = ""
    status: str = "passed"
    failures: list[str] = field(default_factory=list)
    notes: str = ""
    seconds: float = 0.0

    @classmethod
    def new(cls, name: str, category: str, model: str, tol: Tolerance, notes: str = "") -> CheckRecord:
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}")
        return cls(name, category, model, tol.atol, tol.rtol, tol.reason, notes=notes)

    def tol(self) -> Tolerance:
        return Tolerance(self.rtol, self.atol, self.tolerance_reason)

    @property
    def passed(self) -> bool:
        return self.status == "passed" and self.examples > 0

    @property
    def failing(self) -> bool:
        """Fails the run: not passed, and not skipped for missing hardware."""
        return not self.passed and self.status != "skipped"

    def add(self, comp: Comparison) -> None:
        self.examples += 1
        if comp.max_abs_err > self.max_abs_err or not self.worst_path:
            self.worst_path = comp.worst_path or self.worst_path
        self.max_abs_err = max(self.max_abs_err, comp.max_abs_err)
        self.max_rel_err = max(self.max_rel_err, comp.max_rel_err)
        if not comp.passed:
            self.fail(comp.report())

    def add_value(self, abs_err: float, rel_err: float = 0.0) -> None:
        self.examples += 1
        self.max_abs_err = max(self.max_abs_err, abs_err)
        self.max_rel_err = max(self.max_rel_err, rel_err)

    def fail(self, text: str) -> None:
        if self.status != "error":
            self.status = "failed"
        if len(self.failures) < MAX_FAILURE_TEXTS and text not in self.failures:
            self.failures.append(text)

    def error(self, text: str) -> None:
        self.status = "error"
        self.failures.append(text)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        for k in ("max_abs_err", "max_rel_err"):
            if not math.isfinite(d[k]):
                d[k] = str(d[k])
        return d


def not_covered(category: str, model: str, why: str) -> CheckRecord:
    rec = CheckRecord(name=f"{category}: not yet covered", category=category, model=model, atol=math.nan,
                      rtol=math.nan, status="not covered", notes=why)
    return rec


def skipped(name: str, category: str, model: str, why: str) -> CheckRecord:
    """A check this machine cannot run (e.g. no GPU): reported with ``why``, never as passed."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}")
    return CheckRecord(name=name, category=category, model=model, atol=math.nan, rtol=math.nan, status="skipped",
                       notes=why)


@dataclass
class Finding:
    name: str
    summary: str
    data: dict[str, Any]


def _fmt(x: float) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "0" if x == 0 else f"{x:.2e}"


def _convergence_section(out_dir: Path, runs: list) -> list[str]:
    """The curves PNG (written next to report.md) and one line per run, for the convergence section."""
    from .convergence import convergence_figure

    md = []
    if runs:
        png = out_dir / CONVERGENCE_PNG
        convergence_figure(runs).savefig(png, dpi=90)
        md += ["", f"![legacy loop vs Trainer.fit, per epoch]({CONVERGENCE_PNG})", "",
               "| run | epochs trained (legacy / port) | best epoch | early stop raised after epoch | "
               "final AUC (legacy / port) | max \\|port − legacy\\| score | max \\|legacy − legacy\\| score, "
               "other thread count | seconds (legacy / port / legacy again) |", "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            L, P = r.legacy, r.port
            ref = "–" if r.legacy_spread is None else _fmt(r.legacy_spread)
            if r.horizon is not None:
                ref += f" (reproduces itself for {r.horizon} epochs)"
            md.append(f"| {r.label} | {L.epochs} / {P.epochs} | {L.best_epoch} / {P.best_epoch} | "
                      f"{L.stop_epoch} / {P.stop_epoch} | {L.auc[-1] if L.auc else '–'} / {P.auc[-1] if P.auc else '–'} | "
                      f"{_fmt(r.port_spread)} | {ref} | {L.seconds:.0f} / {P.seconds:.0f} / "
                      f"{r.reference.seconds if r.reference is not None else 0:.0f} |")
    return md


def write_reports(out_dir: Path, records: list[CheckRecord], findings: list[Finding], meta: dict,
                  convergence_runs: list | None = None) -> tuple[Path, Path]:
    """``convergence_runs``: the :class:`parity.convergence.ConvergenceResult` s of the run, drawn into
    ``convergence_curves.png`` and linked from the convergence section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = [r for r in records if r.failing and r.status != "not covered"]
    uncovered = [r for r in records if r.status == "not covered"]
    skips = [r for r in records if r.status == "skipped"]
    summary = {
        "checks": len(records), "passed": sum(r.passed for r in records), "failed": len(failed),
        "not_covered": len(uncovered), "skipped": len(skips), "all_passed": not failed and not uncovered,
    }
    doc = {"meta": meta, "summary": summary, "checks": [r.to_json() for r in records],
           "findings": [asdict(f) for f in findings]}
    if convergence_runs:
        doc["convergence_runs"] = [r.summary() for r in convergence_runs]
    jpath = out_dir / "report.json"
    jpath.write_text(json.dumps(doc, indent=2, default=str))

    md = ["# Parity report: legacy TSA (`reference/`) vs Lightning port (`lightning_port/`)", ""]
    md.append(f"Run {meta.get('started')} on {meta.get('host')}, torch {meta.get('torch')}, hypothesis profile "
              f"`{meta.get('profile')}`, {meta.get('seconds', 0):.0f} s. "
              f"{summary['passed']}/{summary['checks']} checks passed, {summary['failed']} failed, "
              f"{summary['not_covered']} not yet covered, {summary['skipped']} skipped (hardware not present: "
              "not covered, never passed).")
    md.append("")
    md.append("Tolerance: an element passes when |port − legacy| ≤ atol + rtol·|legacy|. `examples` counts "
              "hypothesis examples (including shrink replays) or fixed cases.")
    md += ["", "## Summary", "", "| category | checks passed | examples | worst abs err | worst rel err | models | result |",
           "|---|---:|---:|---:|---:|---|---|"]
    for cat in CATEGORIES:
        rows = [r for r in records if r.category == cat]
        if not rows:
            md.append(f"| {cat} | 0/0 | 0 | – | – | – | not run |")
            continue
        ok = sum(r.passed for r in rows)
        n_skip = sum(r.status == "skipped" for r in rows)
        models = sorted({r.model.split(":")[0] for r in rows})
        result = ("pass" if ok == len(rows) else
                  f"pass; {n_skip} skipped (no GPU: not covered)" if ok and ok + n_skip == len(rows) else
                  "skipped (no GPU: not covered)" if n_skip == len(rows) else
                  "not yet covered" if all(r.status in ("not covered", "skipped") for r in rows if not r.passed)
                  else "**FAIL**")
        md.append(f"| {cat} | {ok}/{len(rows)} | {sum(r.examples for r in rows)} | "
                  f"{_fmt(max(r.max_abs_err for r in rows))} | {_fmt(max(r.max_rel_err for r in rows))} | "
                  f"{', '.join(models)} | {result} |")
    for cat in CATEGORIES:
        rows = [r for r in records if r.category == cat]
        md += ["", f"## {cat}", ""]
        if not rows:
            md.append("_no checks registered_")
            continue
        md.append("| check | model | examples | worst abs err | worst rel err | atol | rtol | result |")
        md.append("|---|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            res = {"passed": "pass" if r.passed else "FAIL (0 examples)", "failed": "**FAIL**",
                   "error": "**ERROR**", "not covered": "not yet covered",
                   "skipped": f"skipped ({r.notes.split(';')[0]})"}[r.status]
            md.append(f"| {r.name} | {r.model} | {r.examples} | {_fmt(r.max_abs_err)} | {_fmt(r.max_rel_err)} | "
                      f"{_fmt(r.atol)} | {_fmt(r.rtol)} | {res} |")
        if cat == "convergence":
            md += _convergence_section(out_dir, convergence_runs or [])
            for note in sorted({f"{r.model}: {r.notes}" for r in rows if r.notes}):
                md.append(f"\n- {note}")
        reasons = sorted({(r.name.split(' ')[0], r.tolerance_reason) for r in rows
                          if r.tolerance_reason and "default" not in r.tolerance_reason})
        for name, reason in reasons:
            md.append(f"\n- tolerance of `{name}`: {reason}")
        for r in rows:
            if r.status == "not covered" or (r.notes and r.status != "skipped" and cat in ("precision", "endpoint")):
                md.append(f"\n- {r.name} / {r.model}: {r.notes}")
            if r.failures:
                md.append(f"\n**{r.name} / {r.model}**:\n")
                for f in r.failures:
                    md.append("```\n" + f[:3000] + "\n```")
    md += ["", "## Findings", ""]
    for f in findings:
        md.append(f"### {f.name}\n\n{f.summary}\n")
        table = f.data.get("table")
        if table:
            head = list(table[0])
            md.append("| " + " | ".join(head) + " |")
            md.append("|" + "---|" * len(head))
            for row in table:
                md.append("| " + " | ".join(_fmt(v) if isinstance(v, float) else str(v) for v in row.values()) + " |")
            md.append("")
    mpath = out_dir / "report.md"
    mpath.write_text("\n".join(md) + "\n")
    return jpath, mpath


def run_meta(profile: str, started: float) -> dict:
    import torch

    return {"profile": profile, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "seconds": time.time() - started}
