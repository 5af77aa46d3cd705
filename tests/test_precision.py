"""Mixed precision: the trainer's precision plugins, the dtype-derived bounds of the `precision` parity
category, planted bugs it catches, and a legacy AMP job (``use_amp`` 1) converted and resumed in ``16-mixed``."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import strategies as st
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_port.trainer import build_trainer, mixed_precision_plugin
from parity import profiles  # noqa: F401  (hypothesis profiles)
from parity import strategies as S
from parity.cases import TINY, ParityCase, case
from parity.checks import RunContext
from parity.checks.precision import (
    _legacy_amp_run,
    adam_drift_bound,
    check_precision,
    legacy_amp_job,
    variant,
)
from parity.tolerances import amp_bounds, amp_depth

CONFIG = S.ModelConfig(dict(TINY, dropout=0.1), "tiny")
LENGTHS = [TINY["seq_len"], 0, 3, 1]


def _quiet_trainer_kwargs(tmp_path):
    return dict(accelerator="cpu", devices=1, default_root_dir=str(tmp_path), progress_bar=False, patience=0,
                score_writer=False, plots=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0, log_every_n_steps=1)


# ------------------------------------------------------------------------------------------- trainer
def test_16_mixed_on_cpu_is_float16_with_a_grad_scaler(tmp_path):
    """Lightning alone turns ``precision="16-mixed"`` on CPU into bf16 without a scaler; the TSA trainer keeps
    the legacy recipe (float16 autocast + GradScaler at 2^16)."""
    plain = pl.Trainer(accelerator="cpu", precision="16-mixed", logger=False, enable_checkpointing=False)
    assert getattr(plain.precision_plugin, "scaler", None) is None  # what we work around

    trainer = build_trainer(precision="16-mixed", **_quiet_trainer_kwargs(tmp_path))
    plugin = trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision)
    assert plugin.precision == "16-mixed"
    assert plugin.device == "cpu"
    assert plugin.scaler is not None and plugin.scaler.get_scale() == 2.0**16
    with plugin.forward_context():
        assert torch.get_autocast_dtype("cpu") == torch.float16

    bf16 = build_trainer(precision="bf16-mixed", **_quiet_trainer_kwargs(tmp_path))
    assert bf16.precision_plugin.precision == "bf16-mixed"
    assert bf16.precision_plugin.scaler is None
    assert mixed_precision_plugin("16-mixed", "cuda") is None  # on a GPU the flag alone is right
    assert mixed_precision_plugin("32", "cpu") is None


# ------------------------------------------------------------------------------------------- bounds
def test_amp_bounds_follow_the_stated_derivation():
    """λ·sqrt(3d)·u one-sided, λ·sqrt(6d)·u two-sided, backward depth 2d+1, with d counted by hand for the
    tiny configuration: 6 aggregation Linears + 2 order layers x (4 attention + 5 MoE stages) + 2 classifier."""
    d = 6 + 2 * (4 + 5) + 2
    assert amp_depth(TINY, "single") == d
    for dtype, u in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        b = amp_bounds(TINY, "single", dtype)
        assert b.forward_one_sided == pytest.approx(5 * math.sqrt(3 * d) * u)
        assert b.forward_two_sided == pytest.approx(5 * math.sqrt(6 * d) * u)
        assert b.gradient_two_sided == pytest.approx(5 * math.sqrt(6 * (2 * d + 1)) * u)
        assert str(round(b.forward_two_sided, 3))[:4] in b.reason or f"{b.forward_two_sided:.3g}" in b.reason
    plain = dict(TINY, use_moe=False, n_layers_order=1, n_layers_feature=3)
    assert amp_depth(plain, "single") == max(6 + 1 * 6 + 2, 3 * 6 + 2)


def test_adam_drift_bound_is_two_lr_per_step_at_first():
    assert adam_drift_bound([1e-3]) == pytest.approx(2e-3)
    two = adam_drift_bound([1e-3, 1e-3])
    assert 4e-3 < two < 4.02e-3  # c_2 = sqrt(sum w_i^2 / v_i) is 1.0013 with betas (0.9, 0.999)


# ------------------------------------------------------------------------------------- planted bugs
class _FixedCase(ParityCase):
    def inputs(self, config):
        return st.just(S.make_batch(config, "single", LENGTHS, seed=5, time_scale=1e6))


FIXED = _FixedCase("single", "tiny", lambda: st.just(CONFIG), full_size=True)


def _run(mutate, name):
    ctx = RunContext(mutate=mutate, profile="quick", weight_scale=1 / 3, shrink=False)
    return {r.name: r for r in check_precision(FIXED, variant(name), ctx)}


@pytest.mark.parametrize("amp", ["cpu-bf16", "cpu-fp16"])
def test_unmutated_port_passes_and_a_dropped_padding_mask_is_caught(amp):
    recs = _run(None, amp)
    assert all(r.passed for r in recs.values()), [f for r in recs.values() for f in r.failures]

    def drop_mask(port):
        order = port.network.order
        original = order.forward

        def forward(table, x_cat, x_num, time_seq=None, attn_mask=None, key_padding_mask=None, **kw):
            return original(table, x_cat, x_num, time_seq, attn_mask, None, **kw)

        order.forward = forward

    recs = _run(drop_mask, amp)
    assert not recs["precision.forward"].passed
    assert "eval[scores]" in "\n".join(recs["precision.forward"].failures)
    assert recs["precision.legacy_control"].passed  # the legacy side is untouched


def test_a_port_output_off_by_5_percent_is_caught_in_float16():
    """Detection power: fp16's two-sided bound is ~3% of the output scale here (bf16's ~24%)."""
    def scale_scores(port):
        original = port.network.forward

        def forward(*args, **kwargs):
            scores, ensemble = original(*args, **kwargs)
            return scores * 1.05, ensemble

        port.network.forward = forward

    recs = _run(scale_scores, "cpu-fp16")
    assert not recs["precision.forward"].passed


# --------------------------------------------------------------------------------- legacy AMP job
def test_legacy_amp_job_converts_and_resumes_in_16_mixed(tmp_path):
    """A legacy ``use_amp`` 1 job (fp16 autocast + GradScaler; its training checkpoint holds no scaler state)
    goes through ``tsa-convert`` and resumes with ``build_trainer(precision="16-mixed")``. Lightning starts a
    fresh scaler at 2^16, like the legacy loop resumed from the same file; the resumed epoch equals the legacy
    loop's resumed epoch: loss scales and skipped steps exactly, losses within the fp16 bound, weights within
    Adam's drift bound."""
    from lightning_port.convert import main as convert_main
    from lightning_port.module import TemporalSelfAttentionClassification

    amp = variant("cpu-fp16")
    c = case("single:tiny")
    full = S.make_batch(CONFIG, "single", [CONFIG.seq_len, 3, 0, 5, 1, CONFIG.seq_len], seed=11)
    batches = [full.rows(slice(0, 3)).batch, full.rows(slice(3, 6)).batch]
    job, first_epoch = legacy_amp_job(c, CONFIG, 1234, batches, amp)
    assert first_epoch.scales[0] == 2.0**16 and "scaler" not in job  # legacy-tsa §14: no scaler state saved
    torch.save(job, tmp_path / "legacy_train_checkpoint.pt")
    hparams = {"modelname": "OrderFeature", **CONFIG.kwargs, "lr": 1e-5, "scheduler_maxlr": 1e-3, "max_epoch": 4,
               "use_amp": 1}
    (tmp_path / "hparams.json").write_text(json.dumps(hparams))
    out = tmp_path / "converted.ckpt"
    assert convert_main([str(tmp_path / "legacy_train_checkpoint.pt"), "--hparams", str(tmp_path / "hparams.json"),
                         "--output", str(out)]) == 0
    ckpt = torch.load(out, weights_only=False)
    assert "MixedPrecision" not in ckpt and "native_amp_scaling_state" not in ckpt

    # the legacy loop resumed from the same file: a fresh GradScaler, one more epoch
    from reference import build_model

    legacy = build_model("single", **CONFIG.kwargs)
    legacy.load_state_dict(job["model"], strict=True)
    steps_done = int(ckpt["global_step"])
    l_loss, l_lrs, l_log, _, _, _ = _legacy_amp_run(
        legacy, batches, "single", amp, 1, 1e-5, 1e-3, 4, start_epoch=int(ckpt["epoch"]), step_offset=steps_done,
        optimizer_state=job["optimizer"], scheduler_state=job["scheduler"])

    scales, losses = [], []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            scales.append(trainer.precision_plugin.scaler.get_scale())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module = TemporalSelfAttentionClassification.load_from_checkpoint(str(out))
    trainer = build_trainer(precision="16-mixed", max_epochs=int(ckpt["epoch"]) + 1, reseed_per_step=100,
                            callbacks=[Record()], **_quiet_trainer_kwargs(tmp_path))
    from torch.utils.data import DataLoader

    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False), ckpt_path=str(out))

    assert scales == l_log.scales and scales[0] == 2.0**16  # fresh scaler on both sides, same trajectory
    bound = amp_bounds(CONFIG.kwargs, "single", torch.float16).forward_two_sided
    assert max(abs(a - b) for a, b in zip(losses, l_loss)) <= bound * max(abs(x) for x in l_loss)
    from lightning_port.weight_map import dropped_legacy_keys, port_to_legacy

    drop = set(dropped_legacy_keys(module.config, "single"))
    port_w = port_to_legacy(module.network.state_dict(), module.config, "single")
    drift = adam_drift_bound(l_log.taken_lrs(l_lrs))
    worst = max(float((port_w[k] - v).abs().max()) for k, v in legacy.state_dict().items()
                if k not in drop and v.numel())
    assert worst <= drift
    # Lightning's own checkpoints of the resumed run carry the scaler, so a Lightning-to-Lightning resume keeps it
    last = tmp_path / "after.ckpt"
    trainer.save_checkpoint(last)
    saved = torch.load(last, weights_only=False)["MixedPrecision"]
    assert saved["scale"] == trainer.precision_plugin.scaler.get_scale()
