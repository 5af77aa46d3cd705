"""``tsa fit|validate|test|predict --config configs/X.yaml``: the LightningCLI of the TSA port.

- ``model``: any LightningModule by ``class_path`` (``lightning_port.TemporalSelfAttentionClassification``
  or ``lightning_port.DualSequenceTSA``), or ``--model ClassName``; ``init_args`` are the legacy
  hyperparameter names.
- ``data``: :class:`lightning_port.data.TSADataModule`; ``data.kind`` left ``null`` is set from the
  model class (dual for ``DualSequenceTSA``); the model's feature counts (``n_cat_features``,
  ``n_num_features``, ``seq_len``, ``n_engineered_num_features``, ``n_embedding``) are handed to the
  datamodule, which checks the files against them at setup.
- ``trainer``: the arguments of :func:`lightning_port.trainer.build_trainer`.
  ``trainer.max_epochs`` is copied to the model's ``max_epochs`` (OneCycleLR's length) when the
  model has one.
- ``--ckpt_path best`` / ``--ckpt_path last`` also work in a fresh process: they resolve to the
  newest run under ``trainer.default_root_dir/<logger_name>/`` (``best-*.ckpt`` / ``last.ckpt``), and
  test / predict / a resumed fit then log into that run's directory, so the score files land next
  to its checkpoints.
- A user's mistake is answered in one line on stderr, exit 2, like the other commands: a bad option
  or value (``tsa: error: Parser key "data.batch_size": Expected a <class 'int'>. Got value: abc``), a
  model configuration the model refuses (``tsa: error: model configuration: dropout must be in [0, 1),
  got 1.5.``), and every data problem :mod:`lightning_port.data` finds (a missing folder or file, NaN,
  codes out of range, shapes: the message names the file). ``TSA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from lightning_port.data import DataError, TSADataModule
from lightning_port.module import DualSequenceTSA
from lightning_port.scoring import ScoreWriter, run_dir
from lightning_port.selection import legacy_selection_problem
from lightning_port.trainer import MONITOR, build_trainer

__all__ = ["TSACLI", "ConfigError", "main", "resolve_checkpoint"]


class ConfigError(ValueError):
    """A model / data configuration the classes refuse at instantiation (one line)."""


_NOISE = ("Expected a <class 'NoneType'>", "Given value", "Subtypes:", "Errors:", "Does not validate against any",
          "- Problem with given class_path")


def one_line(message: str) -> str:
    """jsonargparse's multi-line messages as one line: the first line plus the specific complaints."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    keep = [lines[0]] if not lines[0].startswith(_NOISE) else []
    for ln in lines[1:]:
        ln = ln[2:].strip() if ln.startswith("- ") else ln
        if ln and not ln.startswith(_NOISE) and ln not in keep:
            keep.append(ln)
    text = " ".join(keep) if keep else lines[0]
    return text if len(text) <= 400 else text[:400] + "..."


def _innermost_message(e: BaseException) -> str:
    """The message of the deepest ValueError in the cause chain (the model's own complaint)."""
    best = e
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ValueError):
            best = cur
        cur = cur.__cause__ or cur.__context__
    return one_line(str(best))


class _SaveConfig(SaveConfigCallback):
    """``config.yaml`` for fit, ``config_<stage>.yaml`` for the others (they share the run directory)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))
        self.config_filename = "config.yaml" if stage == "fit" else f"config_{stage}.yaml"
        super().setup(trainer, pl_module, stage)


def _run_dirs(root: Path, name: str, version: Any) -> list[Path]:
    base = root / name
    if version is not None:
        v = version if isinstance(version, str) else f"version_{version}"
        return [base / v]
    return [p for p in base.glob("*") if p.is_dir()] if base.is_dir() else []


def resolve_checkpoint(alias: str, root: str | Path, name: str = "tsa", version: Any = None) -> Path | None:
    """``best`` / ``last`` → the file of the newest run (by ``last.ckpt`` time) under ``root/name``."""
    runs = []
    for run in _run_dirs(Path(root), name, version):
        ck = run / "checkpoints"
        files = list(ck.glob("best-*.ckpt")) if alias == "best" else [ck / "last.ckpt"]
        files = [f for f in files if f.is_file()]
        if files:
            newest = max(files, key=lambda f: f.stat().st_mtime)
            runs.append((newest.stat().st_mtime, newest))
    if not runs:
        return None
    return max(runs)[1]


def _class_from_path(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def _is_dual(class_path: str) -> bool:
    """The model class is the dual-sequence one: a subclass of :class:`DualSequenceTSA`, or (a class the CLI
    cannot import) one whose name says ``dual``."""
    cls = _class_from_path(class_path)
    if isinstance(cls, type) and issubclass(cls, DualSequenceTSA):
        return True
    return "dual" in class_path.rsplit(".", 1)[-1].lower()


class TSACLI(LightningCLI):
    """LightningCLI wired to the TSA datamodule and trainer factory (see the module docstring)."""

    def init_parser(self, **kwargs: Any) -> Any:
        parser = super().init_parser(**kwargs)
        original = parser.error

        def error(message: str, ex: Exception | None = None) -> None:
            if getattr(parser, "exit_on_error", True) is False or os.environ.get("TSA_DEBUG"):
                original(message, ex)
                return
            print(f"tsa: error: {one_line(message)} (tsa {{fit,validate,test,predict}} --help lists the options)",
                  file=sys.stderr)
            sys.exit(2)

        parser.error = error  # one line, like the other commands (jsonargparse prints the usage and a block)
        return parser

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(
            model_class=None,
            datamodule_class=TSADataModule,
            trainer_class=build_trainer,
            subclass_mode_model=True,
            save_config_callback=_SaveConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "tsa"},
            args=args,
            run=run,
            **kwargs,
        )

    # ---- parsing ---------------------------------------------------------------------------------
    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        ckpt = cfg.get("ckpt_path")
        tr = cfg.trainer
        if tr.get("legacy_selection"):
            init_args = cfg.model.get("init_args") if hasattr(cfg.model, "get") else None
            n_classes = init_args.get("n_classes") if init_args is not None and hasattr(init_args, "get") else None
            problem = legacy_selection_problem(tr.get("val_check_interval"), tr.get("check_val_every_n_epoch"),
                                               n_classes)
            if problem:
                parser.error(problem)
        if ckpt in ("best", "last"):
            found = resolve_checkpoint(ckpt, tr.default_root_dir, tr.logger_name, tr.logger_version)
            if found is not None:
                cfg.ckpt_path = str(found)
                rank_zero_info(f"tsa: --ckpt_path {ckpt} -> {found}")
            elif ckpt == "best" and sub != "fit":
                parser.error(
                    f"--ckpt_path best: no best-*.ckpt under {Path(tr.default_root_dir) / tr.logger_name}/*/checkpoints "
                    "(set --trainer.default_root_dir to the fit's root, or give the file)"
                )
        ckpt = cfg.get("ckpt_path")
        # log next to the checkpoint's run: <root>/<name>/<version>/checkpoints/x.ckpt
        if ckpt and tr.logger_version is None:
            p = Path(ckpt).resolve()
            root = (Path(tr.default_root_dir) / tr.logger_name).resolve()
            if p.parent.name == "checkpoints" and p.parent.parent.parent == root:
                tr.logger_version = p.parent.parent.name

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        model = cfg.model
        class_path = model.get("class_path", "") if hasattr(model, "get") else ""
        if cfg.data.get("kind") is None:
            cfg.data.kind = "dual" if _is_dual(class_path) else "single"
        init_args = model.get("init_args") if hasattr(model, "get") else None
        max_epochs = cfg.trainer.get("max_epochs")
        if init_args is not None and "max_epochs" in init_args and max_epochs is not None:
            init_args.max_epochs = max_epochs  # OneCycleLR spans the epochs the trainer runs

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as e:
            if os.environ.get("TSA_DEBUG"):
                raise
            raise ConfigError(f"model / data configuration: {_innermost_message(e)}") from e
        hparams = dict(getattr(self.model, "hparams", {}) or {})
        if isinstance(self.datamodule, TSADataModule):
            self.datamodule.configure_from_model(hparams)
            if self.datamodule.kind == "single" and _is_dual(type(self.model).__module__ + "." + type(self.model).__name__):
                raise ValueError("data.kind is 'single' but the model is a dual-sequence model: set data.kind: dual")

    # ---- reporting -------------------------------------------------------------------------------
    def after_fit(self) -> None:
        ck = self.trainer.checkpoint_callback
        if ck is None or not self.trainer.is_global_zero:
            return
        best = ck.best_model_score
        score = f"{float(best):.4f}" if best is not None else "n/a"
        print(f"tsa: best checkpoint {ck.best_model_path} ({ck.monitor or MONITOR} {score}); last {ck.last_model_path}")
        print(f"tsa: logs in {run_dir(self.trainer)}")

    def _report_written(self) -> None:
        if not self.trainer.is_global_zero:
            return
        for cb in self.trainer.callbacks:
            if isinstance(cb, ScoreWriter) and cb.written:
                for path in cb.written.values():
                    print(f"tsa: wrote {path}")

    def after_test(self) -> None:
        self._report_written()

    def after_predict(self) -> None:
        self._report_written()


def main(args: list[str] | None = None) -> int:
    """Console entry point ``tsa``: 0 done, 2 a user's data or configuration mistake (one line on stderr)."""
    try:
        TSACLI(args=args)
    except (DataError, ConfigError) as e:
        if os.environ.get("TSA_DEBUG"):
            raise
        print(f"tsa: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
