"""The `convergence` category: the legacy ``train.py`` loop of ``reference/`` and ``Trainer.fit`` on the port with
``legacy_selection``, epoch by epoch until early stopping, on ``tsa-synth`` data (issue 14).

Each example builds a legacy model from a seed, converts its weights through the weight map into the port, writes a
small ``tsa-synth`` dataset, and runs :func:`parity.convergence.run_convergence` (fp32 CPU, the same per-epoch
training order, reseeding before every step and every evaluation pass). Checks per model:

- `convergence.train_loss`: per-step and per-epoch training losses and the learning rates;
- `convergence.vali_loss`: per-epoch validation loss (summed over batches) and every validation score;
- `convergence.auc`: per-epoch raw validation AUC (sklearn on each side's scores);
- `convergence.selection`: the rounded AUCs, the best epoch, the epoch that raised early stopping, the epochs
  trained; and the port's decisions are the legacy rules applied to its own AUCs;
- `convergence.score_files`: the score files of the reloaded best weights (vali, cali, tags, percentile table).

Tolerances grow with the steps taken (``parity.convergence.STEP_REASON``). In the deep profile each example also runs
the legacy loop a second time with another torch thread count (only the rounding changes): its distance from the
first legacy run is reported next to the port's, and the curves are compared for as long as the legacy reproduces
itself within the step tolerance. The configurations have no
value-dependent routing: top-2 MoE (``num_experts`` >= 2) makes training chaotic at fp32 (docs/parity.md), so
the examples use the legacy ``train.py`` default MoE (one expert) or none.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..report import CheckRecord
from .base import RunContext

CHECKS = ("convergence.train_loss", "convergence.vali_loss", "convergence.auc", "convergence.selection",
          "convergence.score_files")

# tsa-synth shape (seq_len set per kind) and a small model: 1 + 1 attention layers of width 16 / 8
SMALL = {"n_cat_features": 6, "n_num_features": 5, "n_classes": 2, "n_embedding": 40,
         "n_engineered_num_features": 3, "dim_embedding_table": 8, "dim_attn_feedforward": 16, "num_heads": 2,
         "dropout": 0.1, "n_layers_order": 1, "n_layers_feature": 1, "emb_tbl_use_bias": 1, "use_time_seq": True}
SEQ_LEN = {"single": 8, "dual": 51}  # dual at 51: the legacy empty-card literal (50) applies


@dataclass(frozen=True)
class Example:
    seed: int  # legacy init seed, tsa-synth seed and training-order seed
    num_experts: int  # 0 = no MoE; 1 = the legacy train.py default (use_moe 1, num_experts 1)


@dataclass(frozen=True)
class Plan:
    examples: tuple[Example, ...]
    rows: int = 512  # training rows (vali and cali: eval_rows each)
    eval_rows: int = 256
    batch_size: int = 64
    lr: float = 1e-4
    scheduler_maxlr: float = 3e-3
    max_epochs: int = 20
    patience: int = 2
    reference: bool = False  # also run the legacy loop again with another thread count (its own reproducibility)


PLANS = {
    "quick": Plan((Example(0, 1),)),
    "parity": Plan((Example(0, 0), Example(0, 1))),
    # more seeds in the same regime: longer runs (1024 rows, patience 3, 30 epochs) leave the range where the
    # legacy loop reproduces itself (docs/parity.md)
    "deep": Plan(tuple(Example(s, e) for s in range(6) for e in (0, 1)), reference=True),
}


def model_kwargs(kind: str, example: Example) -> dict:
    kw = dict(SMALL, seq_len=SEQ_LEN[kind], use_moe=example.num_experts > 0, num_experts=max(example.num_experts, 1))
    if kind == "single":
        kw["use_mlp"] = 0
    return kw


def run_example(kind: str, example: Example, plan: Plan, work: Path):
    """One convergence run: tsa-synth data, a seeded legacy model, the port on its converted weights."""
    from lightning_port.synth import SynthConfig, write_dataset

    from ..cases import case
    from ..convergence import Protocol, run_convergence
    from ..pairs import make_pair
    from ..strategies import ModelConfig

    data = work / "data"
    write_dataset(data, SynthConfig(kind=kind, rows=plan.rows, eval_rows=plan.eval_rows, seq_len=SEQ_LEN[kind],
                                    seed=example.seed))
    config = ModelConfig(model_kwargs(kind, example), "synth-small")
    pair = make_pair(case(f"{kind}:drawn"), config, example.seed, perturb=False, lr=plan.lr,
                     scheduler_maxlr=plan.scheduler_maxlr, max_epochs=plan.max_epochs)
    protocol = Protocol(max_epochs=plan.max_epochs, patience=plan.patience, batch_size=plan.batch_size, lr=plan.lr,
                        scheduler_maxlr=plan.scheduler_maxlr, data_seed=example.seed)
    moe = f"MoE x{example.num_experts}" if example.num_experts else "no MoE"
    label = f"{kind} seed {example.seed}, {moe}"
    return run_convergence(pair.legacy, pair.port, data, kind, protocol, work / "run", label=label,
                           reference_threads=-1 if plan.reference else None)


def check_convergence(kind: str, ctx: RunContext) -> list[CheckRecord]:
    """The legacy loop vs ``Trainer.fit`` with ``legacy_selection`` until early stopping, for each example of the
    profile's plan; the runs are kept in ``ctx.extra["convergence"]`` for the report's curves."""
    from ..tolerances import AUC_REASON, SELECTION_REASON, STEP_TOL, Tolerance

    plan = PLANS.get(ctx.profile, PLANS["parity"])
    model = f"{kind}:synth-small"
    tols = {"convergence.train_loss": STEP_TOL, "convergence.vali_loss": STEP_TOL,
            "convergence.auc": Tolerance(0.0, 0.0, AUC_REASON),
            "convergence.selection": Tolerance(0.0, 0.0, SELECTION_REASON),
            "convergence.score_files": STEP_TOL}
    notes = (f"{len(plan.examples)} run(s): {plan.rows} training rows, {plan.eval_rows} vali/cali rows, batch "
             f"{plan.batch_size}, lr {plan.lr:g}, max_lr {plan.scheduler_maxlr:g}, max_epochs {plan.max_epochs}, "
             f"patience {plan.patience}; legacy reference run (other thread count): {'yes' if plan.reference else 'no'}; "
             "atol/rtol shown are those at the last step compared")
    records = {name: CheckRecord.new(name, "convergence", model, tols[name], notes=notes) for name in CHECKS}
    for example in plan.examples:
        t0 = time.time()
        try:
            with tempfile.TemporaryDirectory(prefix="tsa-convergence-") as tmp:
                res = run_example(kind, example, plan, Path(tmp))
        except Exception as e:  # a crash on either side is a failed check, with its traceback
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
            for rec in records.values():
                rec.error(f"{kind} {example}: {tb}")
            continue
        for name, comp in res.comparisons.items():
            rec = records[name]
            rec.add(comp)
            if comp.tolerance.rtol > rec.rtol or comp.tolerance.atol > rec.atol:
                rec.rtol, rec.atol = max(rec.rtol, comp.tolerance.rtol), max(rec.atol, comp.tolerance.atol)
        if res.notes:
            records["convergence.selection"].notes += f"; {res.label}: {res.notes.strip()}"
        ctx.extra.setdefault("convergence", []).append(res)
        ctx.log(f"    {res.label}: {res.legacy.epochs} epochs (legacy) / {res.port.epochs} (port), best "
                f"{res.legacy.best_epoch}/{res.port.best_epoch}, stop {res.legacy.stop_epoch}/{res.port.stop_epoch} "
                f"({time.time() - t0:.0f}s)")
    return list(records.values())
