"""``tsa-verify``'s options: what the user asked for (:class:`Options`), checked before any work
(:func:`check_options`), and the one error that refuses (:class:`VerifyError`: one line, exit 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROG = "tsa-verify"
EXIT_PASS, EXIT_FAIL, EXIT_REFUSED = 0, 1, 2
DEFAULT_MOE_SEEDS = 16
SPLITS = ("vali", "cali")  # the splits a legacy job scored (score_file.csv / cali_score_file.csv)


class VerifyError(Exception):
    """Refused: one line, exit 2."""


@dataclass
class Options:
    source: str
    data_dir: str
    hparams: str | None = None
    split: str = "all"
    batch_size: int | None = None
    world_size: int | None = None
    epoch: int | None = None
    moe_seeds: int = DEFAULT_MOE_SEEDS
    rows: int | None = None
    out: str = "reports/verify"
    test_name: str | None = None
    seed: int = 0
    version: str = "v0"
    trust_pickle: bool = False
    file_atol: float | None = None
    progress: bool | None = None  # None: tqdm decides (off when stderr is not a terminal)
    plots: bool = True
    train_epochs: int = 0  # > 0: also the training comparison (legacy loop vs Trainer.fit) for up to N epochs


def _split_list(split: str) -> list[str]:
    if split == "all":
        return list(SPLITS)
    if split in SPLITS:
        return [split]
    raise VerifyError(f"--split {split!r}; expected vali, cali or all")


def check_options(opts: Options) -> tuple[list[str], Path]:
    """Refuse options that cannot be right before anything is read; returns the splits and the data folder."""
    if opts.batch_size is not None and opts.batch_size < 1:
        raise VerifyError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.world_size is not None and opts.world_size < 1:
        raise VerifyError(f"--world-size must be >= 1, got {opts.world_size}")
    if opts.epoch is not None and opts.epoch < 0:
        raise VerifyError(f"--epoch must be >= 0, got {opts.epoch}")
    if opts.epoch is not None and opts.world_size is None:
        raise VerifyError("--epoch applies to a multi-GPU job's DistributedSampler order: give --world-size too")
    if opts.rows is not None and opts.rows < 1:
        raise VerifyError(f"--rows must be >= 1, got {opts.rows}")
    if opts.train_epochs < 0:
        raise VerifyError(f"--train-epochs must be >= 0, got {opts.train_epochs}")
    if opts.file_atol is not None and not (0 <= opts.file_atol < 1):
        raise VerifyError(f"--file-atol must be in [0, 1), got {opts.file_atol}")
    splits = _split_list(opts.split)
    data_dir = Path(opts.data_dir)
    if not data_dir.is_dir():
        raise VerifyError(f"{data_dir}: no such data folder; expected the legacy numpy layout (flat, or SageMaker "
                          "channels vali/ and cali/)")
    return splits, data_dir
