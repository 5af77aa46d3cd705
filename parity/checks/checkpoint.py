"""The `checkpoint` category: every legacy file format of every recorded case through `tsa-convert`.

- `checkpoint.load_and_score`: legacy file -> Lightning checkpoint -> `load_from_checkpoint(path)` alone ->
  eval scores/ensemble (seed 7) vs the legacy model (`reference/`) on the file's weights, same seed.
- `checkpoint.roundtrip`: legacy -> Lightning -> legacy gives back every tensor bit for bit.
- `checkpoint.resume`: a legacy training checkpoint resumed in the legacy loop for one epoch vs the converted
  checkpoint resumed with `Trainer.fit(ckpt_path=...)` (reseed-per-step): losses, learning rates, weights.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

import torch

from parity.fixtures import all_cases, forward_args

from ..compare import compare
from ..report import CheckRecord
from ..tolerances import ADAM_REASON, EXACT, Tolerance, tolerance_for

FORMATS = ("model.pt", "ddp_checkpoint.pt", "train_checkpoint.pt", "model_legacy_format.pt")


def _hparams(case) -> dict:
    name = "OrderFeature" if case.kind == "single" else "TwoSeqMoEOrderFeature"
    return {"modelname": name, **case.kwargs, "lr": 1e-5, "scheduler_maxlr": 1e-3, "max_epoch": 4}


def _legacy_scores(case, state_dict):
    from reference import build_model

    model = build_model(case.kind, **case.kwargs)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    args, kwargs = forward_args(case.inputs, case.kind)
    with torch.no_grad():
        torch.manual_seed(7)
        scores, ensemble = model(*args, **kwargs)
    return {"scores": scores, "ensemble": ensemble}


def _port_scores(module, case):
    module.eval()
    args, kwargs = forward_args(case.inputs, case.kind)
    with torch.no_grad():
        torch.manual_seed(7)
        scores, ensemble = module(*args, **kwargs)
    return {"scores": scores, "ensemble": ensemble}


def _resume(case, ckpt_path: Path, training_file: Path):
    """One more epoch after the recorded six-step run, in the legacy loop and in Lightning."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_port.convert import module_class
    from lightning_port.weight_map import dropped_legacy_keys, port_to_legacy
    from reference import build_model
    from reference.training import make_optimizer, train_one_epoch

    from ..rng import ReseedPerStep
    from ..tolerances import GradientNoiseRecorder, zero_gradient_key_biases
    from .recorded import _fixture_batch
    from .training import _noise_as_legacy, gradient_noise_callback

    ck = torch.load(training_file, map_location="cpu", weights_only=True)
    steps_done = len(case.trajectory["loss"])
    n = case.inputs["y"].shape[0]
    batches = [_fixture_batch(case, rows) for rows in (slice(0, n // 2), slice(n // 2, n))]

    legacy = build_model(case.kind, **case.kwargs)
    legacy.load_state_dict({k.removeprefix("module."): v for k, v in ck["model"].items()}, strict=True)
    opt, sched = make_optimizer(legacy, lr=1e-5, scheduler_maxlr=1e-3, max_epoch=ck["scheduler"]["total_steps"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    noise = GradientNoiseRecorder(legacy, opt)
    legacy_lrs = []

    def before(step):
        legacy_lrs.append(opt.param_groups[0]["lr"])
        torch.manual_seed(100 + step)

    legacy_losses = train_one_epoch(legacy, batches, opt, torch.nn.CrossEntropyLoss(reduction="sum"),
                                    epoch=ck["epoch"] + 1, kind=case.kind, before_step=before, step_offset=steps_done)
    sched.step()

    module = module_class(case.kind).load_from_checkpoint(str(ckpt_path))
    cb = ReseedPerStep()
    trainer = pl.Trainer(max_epochs=int(torch.load(ckpt_path, weights_only=False)["epoch"]) + 1, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[cb, gradient_noise_callback(module)])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False), ckpt_path=str(ckpt_path))
    drop = set(dropped_legacy_keys(module.config, case.kind))
    port_final = {k: v for k, v in port_to_legacy(module.network.state_dict(), module.config, case.kind).items()
                  if k not in drop}
    legacy_final = {k: v for k, v in legacy.state_dict().items() if k not in drop}
    return (cb.losses, cb.lrs, port_final), (legacy_losses, legacy_lrs, legacy_final), _noise_as_legacy(
        module, case.kind, noise), zero_gradient_key_biases(legacy)


def check_checkpoint(ctx) -> list:
    from lightning_port.convert import (
        legacy_to_lightning,
        lightning_to_legacy,
        load_file,
        module_class,
        split_legacy,
    )

    from .training import adam_weights_comparison

    records = []
    for case in all_cases():
        model = f"{case.kind}:fixture-{case.name}"
        out_tol = tolerance_for("forward.eval_outputs")
        rec_score = CheckRecord.new("checkpoint.load_and_score", "checkpoint", model, out_tol,
                                    notes="legacy file -> tsa-convert -> load_from_checkpoint(path) alone")
        rec_round = CheckRecord.new("checkpoint.roundtrip", "checkpoint", model, EXACT,
                                    notes="legacy -> Lightning -> legacy, every key")
        todo = [f for f in FORMATS if case.has(f)]
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in todo:
                try:
                    legacy_sd, training, _ = split_legacy(load_file(case.file(fmt)), fmt)
                    ckpt, _ = legacy_to_lightning(legacy_sd, _hparams(case), training, source=fmt)
                    path = Path(tmp) / f"{fmt}.ckpt"
                    torch.save(ckpt, path)
                    module = module_class(case.kind).load_from_checkpoint(str(path))
                    context = {"fixture": str(case.path), "format": fmt}
                    rec_score.add(compare(_port_scores(module, case), _legacy_scores(case, legacy_sd), out_tol,
                                          context=context))
                    back = lightning_to_legacy(torch.load(path, map_location="cpu", weights_only=False), fmt)
                    if list(back) != list(legacy_sd):
                        rec_round.fail(f"{fmt}: legacy key order or set differs after the round trip")
                    rec_round.add(compare(back, legacy_sd, EXACT, context=context))
                    if fmt == "train_checkpoint.pt" and case.trajectory is not None and not case.full_size:
                        rec_resume = CheckRecord.new(
                            "checkpoint.resume", "checkpoint", model, Tolerance(out_tol.rtol, out_tol.atol, ADAM_REASON),
                            notes="legacy loop resumed vs Trainer.fit(ckpt_path=converted), one more epoch")
                        (p_loss, p_lrs, p_final), (l_loss, l_lrs, l_final), noisy, key_biases = _resume(
                            case, path, case.file(fmt))
                        rec_resume.add(compare({"loss": p_loss, "lr": p_lrs}, {"loss": l_loss, "lr": l_lrs}, out_tol,
                                               context=context))
                        rec_resume.add(adam_weights_comparison(p_final, l_final, l_lrs, rec_resume.tol(), context,
                                                               noisy=noisy, key_biases=key_biases))
                        records.append(rec_resume)
                except Exception as e:  # a crash is a failed check, reported with its traceback
                    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
                    rec_score.error(f"{fmt}: {text}")
        records += [rec_score, rec_round]
    return records
