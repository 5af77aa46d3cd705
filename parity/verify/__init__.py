"""``tsa-verify``: prove the port equal to a team's own legacy job, on their data, against their score files.

::

    tsa-verify SOURCE --data-dir DATA [--hparams H] [--split vali|cali|all] [--batch-size N]
               [--world-size N] [--epoch E] [--moe-seeds K] [--rows N] [--train-epochs N]
               [--out reports/verify]
    python -m parity verify ...        # the same command

SOURCE is what the legacy SageMaker job left: ``model.tar.gz``, its extracted folder, or a model
file (:func:`lightning_port.legacy_job.open_job`). The model is converted in memory and every row of
the splits is scored by ``reference/`` (the legacy model, fed by the legacy data loader) and by the
port (fed by :mod:`lightning_port.data`), batched as the legacy job batched them (legacy-tsa §12):
the job's ``batch_size`` (``--batch-size`` overrides), file order, last batch short; with
``--world-size N`` each rank's share of the ``DistributedSampler`` order (shuffle on, seed 0,
``set_epoch(epoch)``), batched separately, gathered rank-major and cut to N.

Two comparisons, both reported (docs/verify.md says what each number means):

1. legacy model vs port on the same batches and the same seeds, row by row (deterministic, MoE
   coin flips included) to the tolerance of ``tsa-convert --verify``;
2. the legacy job's own files (``score_file.csv`` / ``tag_file.csv``, ``cali_*``,
   ``percentile_score.pkl``) vs the port: row by row for models whose scores do not depend on coin
   flips; for MoE models with coin flips the statistical criterion of :func:`~parity.verify.moe.judge_moe`.

With ``--train-epochs N``, a third: the legacy ``train.py`` loop and ``Trainer.fit`` fine-tuning the
job's model side by side for up to N epochs (:func:`~parity.verify.training.compare_training`, the comparison of
:mod:`parity.convergence`).

Writes ``report.json``, ``report.md`` and PNGs under ``--out``. Exit 0 pass, 1 beyond tolerance,
2 refused (one line on stderr). Memory: the splits are memory-mapped and scored batch by batch;
per split the command keeps O(rows) float32 arrays (the MoE draws on disk in a private temporary
folder) and one batch of each model.

The modules, one job each: :mod:`.options` (what the user asked for, checked first), :mod:`.order` (the
legacy batches and line order), :mod:`.scoring` (both models, batched as the job), :mod:`.moe` (the MoE
criterion), :mod:`.judging` (the comparisons, on :mod:`parity.compare` and :mod:`parity.tolerances`),
:mod:`.training` (``--train-epochs``), :mod:`.report` (report.json, report.md, PNGs), :mod:`.job`
(:func:`run`, a few named steps) and :mod:`.cli` (``tsa-verify``'s ``main``).
"""

from .cli import build_parser, main
from .job import run
from .judging import FILE_TOL, MODEL_TOL
from .moe import MoEJudgement, judge_moe
from .options import DEFAULT_MOE_SEEDS, Options, VerifyError
from .order import Plan, ddp_order, find_epochs, make_plan

__all__ = [
    "DEFAULT_MOE_SEEDS",
    "FILE_TOL",
    "MODEL_TOL",
    "MoEJudgement",
    "Options",
    "Plan",
    "VerifyError",
    "build_parser",
    "ddp_order",
    "find_epochs",
    "judge_moe",
    "main",
    "make_plan",
    "run",
]
