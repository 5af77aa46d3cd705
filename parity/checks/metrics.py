"""The `metrics` category: AUROC, score files and the percentile table vs the legacy computations."""

from __future__ import annotations

import traceback

import torch

from ..compare import compare, from_problems
from ..pairs import make_pair
from ..report import CheckRecord
from .base import RunContext, run_property


def _port_auroc(scores, labels) -> float:
    """The port's AUROC metric object (as its LightningModule builds it) on (scores, labels)."""
    try:
        from lightning_port.module import _metrics

        metric = _metrics(2)["auroc"]
    except (ImportError, KeyError):  # pragma: no cover - the port's private helper moved
        import torchmetrics

        metric = torchmetrics.AUROC(task="binary")
    metric.update(torch.as_tensor(scores), torch.as_tensor(labels))
    return float(metric.compute())


def check_metrics(ctx: RunContext) -> list[CheckRecord]:
    """AUROC: the port's torchmetrics vs legacy sklearn ``legacy_auc`` (drawn scores with ties and
    extremes; and end to end: ``Trainer.validate``'s ``val/auroc`` vs the legacy evaluation pass).
    Score, tag files and the percentile table: byte-identical between the legacy writers
    (``reference.training``) and the port's (``lightning_port.scoring``)."""
    import tempfile
    from pathlib import Path

    from reference import training as R

    from .. import strategies as S
    from ..cases import CASES
    from ..tolerances import tolerance_for

    case0 = CASES[0]
    tol = tolerance_for("metrics.auroc")
    rec = {"metrics.auroc": CheckRecord.new("metrics.auroc", "metrics", "metrics", tol,
                                            notes="torchmetrics binary AUROC vs sklearn roc_auc_score"),
           "metrics.score_files": CheckRecord.new("metrics.score_files", "metrics", "metrics",
                                                  tolerance_for("metrics.score_files")),
           "metrics.percentile_table": CheckRecord.new("metrics.percentile_table", "metrics", "metrics",
                                                       tolerance_for("metrics.percentile_table"))}
    try:
        from lightning_port import scoring as P
    except ImportError as e:  # pragma: no cover
        for k in ("metrics.score_files", "metrics.percentile_table"):
            rec[k].error(f"lightning_port.scoring not importable: {e}")
        P = None

    def body(data):
        scores, labels, recipe = data.draw(S.score_arrays(), label="scores")
        comps = {"metrics.auroc": compare(_port_auroc(scores, labels), R.legacy_auc(labels, scores), tol,
                                          path="auroc", context=recipe)}
        if P is not None:
            with tempfile.TemporaryDirectory() as d:
                d = Path(d)
                R.write_score_files(d / "legacy", scores, labels, scores[::-1].copy(), labels)
                (d / "port").mkdir()
                P.write_score_file(d / "port/score_file.csv", scores)
                P.write_tag_file(d / "port/tag_file.csv", labels)
                P.write_score_file(d / "port/cali_score_file.csv", scores[::-1].copy())
                P.write_tag_file(d / "port/cali_tag_file.csv", labels)
                P.write_percentile_table(d / "port/percentile_score.pkl", scores[::-1].copy())
                problems = []
                for name in ("score_file.csv", "tag_file.csv", "cali_score_file.csv", "cali_tag_file.csv"):
                    if (d / "legacy" / name).read_bytes() != (d / "port" / name).read_bytes():
                        problems.append(f"{name}: bytes differ")
                comps["metrics.score_files"] = from_problems(problems, tolerance_for("metrics.score_files"),
                                                             path="score_files", context=recipe)
                same = (d / "legacy/percentile_score.pkl").read_bytes() == (d / "port/percentile_score.pkl").read_bytes()
                comps["metrics.percentile_table"] = from_problems(
                    [] if same else ["percentile_score.pkl: bytes differ"], tolerance_for("metrics.percentile_table"),
                    path="percentile_score.pkl", context=recipe)
        return comps

    records = run_property(rec, ctx, case0, 2.0, body)
    records.append(_auroc_end_to_end(ctx))
    return records


def _auroc_end_to_end(ctx: RunContext) -> CheckRecord:
    """``Trainer.validate`` on the port (its logged ``val/auroc``) vs the legacy evaluation pass +
    ``legacy_auc`` on the same weights and batches (a no-MoE model: eval is deterministic)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from reference.training import evaluate, legacy_auc

    from .. import strategies as S
    from ..cases import case as get_case
    from ..tolerances import tolerance_for

    tol = tolerance_for("metrics.auroc")
    rec = CheckRecord.new("metrics.val_auroc_end_to_end", "metrics", "single:tiny-plain", tol,
                          notes="Trainer.validate val/auroc vs legacy evaluate + legacy_auc")
    c = get_case("single:tiny-plain")
    try:
        from ..cases import TINY_PLAIN

        config = S.ModelConfig(dict(TINY_PLAIN, n_classes=2), "tiny-plain")
        for seed in range(3):
            pair = make_pair(c, config, seed, mutate=ctx.mutate)
            batches = [S.make_batch(config, "single", [config.seq_len, 0, 3, 1, 2, 5, 4, 6][: 8], 100 * seed + i).batch
                       for i in range(3)]
            for i, b in enumerate(batches):
                b["y"] = torch.tensor([0, 1] * 4)[torch.randperm(8, generator=torch.Generator().manual_seed(i))]
            probs, labels, _ = evaluate(pair.legacy, batches, "single")
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False)
            res = trainer.validate(pair.port, DataLoader(batches, batch_size=None), verbose=False)[0]
            rec.add(compare(res["val/auroc"], legacy_auc(labels, probs), tol, path="val/auroc",
                            context={"config": config.kwargs, "seed": seed}))
    except Exception as e:
        rec.error("".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:])
    return rec
