"""tsa-convert: every legacy format of every recorded case -> Lightning -> legacy; hostile files;
resuming a legacy training checkpoint in Lightning vs the legacy loop; --verify exit codes.

Parametrized over ``parity.fixtures.all_cases()``, so held-out recordings dropped in with
``TSA_LEGACY_FIXTURES`` are covered too (full-size cases only get the cheap checks).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import reference
from lightning_port import DualSequenceTSA, TemporalSelfAttentionClassification, convert
from lightning_port.weight_map import dropped_legacy_keys
from parity.fixtures import HOSTILE_DIR, all_cases, forward_args, load_case

CASES = all_cases()
FORMATS = ("model.pt", "ddp_checkpoint.pt", "train_checkpoint.pt", "model_legacy_format.pt")
CASE_FILES = [pytest.param(c, f, id=f"{c.name}-{f[:-3]}") for c in CASES for f in FORMATS if c.has(f)]
TRAINABLE = [pytest.param(c, id=c.name) for c in CASES
             if c.has("train_checkpoint.pt") and c.trajectory is not None and not c.full_size]
CLASSES = {"single": TemporalSelfAttentionClassification, "dual": DualSequenceTSA}
MODELNAMES = {"single": "OrderFeature", "dual": "TwoSeqMoEOrderFeature"}
PWNED = Path("/tmp/TSA_PWNED_MARKER")
ATOL, RTOL = 1e-5, 1e-4


def hparams_of(case, **extra) -> dict:
    # the legacy trajectory protocol: Adam(lr 1e-5) + OneCycleLR(max_lr 1e-3, total_steps 4)
    return {**case.kwargs, "modelname": MODELNAMES[case.kind], "lr": 1e-5, "scheduler_maxlr": 1e-3,
            "max_epoch": 4, "loss": "CrossEntropyLoss", "some_unknown_key": "ignored", **extra}


def write_hparams(tmp_path: Path, case) -> Path:
    path = tmp_path / "h.json"
    path.write_text(json.dumps(hparams_of(case)))
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def legacy_model(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference.build_model(case.kind, **case.kwargs)


def strip_module(sd):
    return {k.removeprefix("module."): v for k, v in sd.items()}


def source_state_dict(case, fmt):
    obj = torch.load(case.file(fmt), map_location="cpu", weights_only=True)
    return strip_module(obj["model"] if fmt == "train_checkpoint.pt" else obj)


# ------------------------------------------------------------------- formats, scores, round trip
@pytest.mark.parametrize(("case", "fmt"), CASE_FILES)
def test_every_format_converts_scores_and_round_trips(case, fmt, tmp_path, capsys):
    h = write_hparams(tmp_path, case)
    out = tmp_path / "out.ckpt"
    code, stdout, err = cli(capsys, case.file(fmt), "--hparams", h, "--output", out)
    assert code == 0, err
    assert "wrote" in stdout
    assert err == ""

    # loads with one call, nothing else
    module = CLASSES[case.kind].load_from_checkpoint(out)
    assert module.hparams.max_epochs == 4
    assert module.hparams.lr == 1e-5
    if fmt == "model.pt":  # same weights in every format: score once per case
        module.eval()
        args, kwargs = forward_args(case.inputs, case.kind)
        with torch.no_grad():
            torch.manual_seed(7)
            scores, ensemble = module(*args, **kwargs)
        torch.testing.assert_close(scores, case.expected["eval_seed7_scores"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ensemble, case.expected["eval_seed7_ensemble"], atol=ATOL, rtol=RTOL)

    # and back: the legacy model loads it strictly, every tensor identical, legacy key order
    back = tmp_path / "back.pt"
    code, _, err = cli(capsys, out, "--to-legacy", "--output", back)
    assert code == 0, err
    sd = torch.load(back, weights_only=True)
    original = source_state_dict(case, fmt)
    assert list(sd) == list(original)
    differ = [k for k in original if not torch.equal(sd[k], original[k])]
    assert differ == []
    legacy_model(case).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_to_legacy_without_stash_fills_unused_with_zeros(case):
    """A checkpoint from training the port (no stashed originals) still loads strictly in legacy."""
    ckpt, _ = convert.legacy_to_lightning(case.state_dict, hparams_of(case))
    del ckpt[convert.META_KEY]
    sd = convert.lightning_to_legacy(ckpt)
    config = CLASSES[case.kind].from_config(hparams_of(case)).config
    dropped = set(dropped_legacy_keys(config, case.kind))
    for k, v in case.state_dict.items():
        if k in dropped:
            assert not v.abs().sum() or not sd[k].abs().sum()
        else:
            assert torch.equal(sd[k], v), k
    legacy_model(case).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_legacy_parameter_order_matches_the_legacy_model(case):
    """The optimizer remap relies on this: the legacy Adam state is indexed by parameters()."""
    config = CLASSES[case.kind].from_config(hparams_of(case)).config
    names = convert.legacy_param_names(case.state_dict, config, case.kind)
    assert names == [n for n, _ in legacy_model(case).named_parameters()]


# ------------------------------------------------------------------------------- hostile files
HOSTILE = {  # file -> words the one-line error must contain
    "model_code_exec.pt": ["posix.system", "--trust-pickle", "refused"],
    "train_checkpoint_old_scheduler.pt": ["getattr", "--trust-pickle", "refused"],
    "model_truncated.pt": ["damaged"],
    "not_a_checkpoint.pt": ["not a PyTorch checkpoint"],
    "model_wrong_shapes.pt": ["missing keys order_attention.dummy_order", "clf.0.weight", "shape mismatch"],
    "model_nan_weights.pt": ["non-finite", "clf.3.weight", "--allow-nonfinite"],
}


@pytest.fixture
def small_single(tmp_path):
    case = load_case(Path(HOSTILE_DIR).parent / "legacy" / "single_small")
    return case, write_hparams(tmp_path, case)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_refused_in_one_line(name, small_single, tmp_path, capsys):
    PWNED.unlink(missing_ok=True)
    _, h = small_single
    out = tmp_path / "out.ckpt"
    code, stdout, err = cli(capsys, HOSTILE_DIR / name, "--hparams", h, "--output", out)
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    for word in HOSTILE[name]:
        assert word in err, (word, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.json"]  # no output, no temp file
    assert not PWNED.exists()


def test_code_exec_file_never_runs_in_a_real_process(small_single, tmp_path):
    """The console entry point as a user runs it (``python -m``): refused, no traceback, no marker.
    (--trust-pickle is never used on this file: it would run the payload, as documented.)"""
    PWNED.unlink(missing_ok=True)
    _, h = small_single
    out = tmp_path / "out.ckpt"
    proc = subprocess.run([sys.executable, "-m", "lightning_port.convert", str(HOSTILE_DIR / "model_code_exec.pt"),
                           "--hparams", str(h), "--output", str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "posix.system" in proc.stderr
    assert not out.exists()
    assert not PWNED.exists()


def test_old_scheduler_converts_only_when_trusted(small_single, tmp_path, capsys):
    case, h = small_single
    out, ref = tmp_path / "old.ckpt", tmp_path / "ref.ckpt"
    code, _, err = cli(capsys, HOSTILE_DIR / "train_checkpoint_old_scheduler.pt", "--hparams", h,
                       "--output", out, "--trust-pickle")
    assert code == 0, err
    assert cli(capsys, case.file("train_checkpoint.pt"), "--hparams", h, "--output", ref)[0] == 0
    got, want = torch.load(out, weights_only=True), torch.load(ref, weights_only=True)  # safe to load now
    sched = got["lr_schedulers"][0]
    assert "anneal_func" not in sched
    assert sched["_anneal_func_type"] == "cos"
    for k, v in want["lr_schedulers"][0].items():
        assert sched[k] == v, k
    assert got["epoch"] == want["epoch"]
    assert got["global_step"] == want["global_step"]
    for k in want["state_dict"]:
        assert torch.equal(got["state_dict"][k], want["state_dict"][k])
    CLASSES[case.kind].load_from_checkpoint(out)


def test_nonfinite_allowed_only_with_a_loud_warning(small_single, tmp_path, capsys):
    _, h = small_single
    out = tmp_path / "nan.ckpt"
    code, _, err = cli(capsys, HOSTILE_DIR / "model_nan_weights.pt", "--hparams", h, "--output", out,
                       "--allow-nonfinite")
    assert code == 0
    assert "WARNING" in err
    assert "clf.3.weight" in err
    assert torch.isnan(torch.load(out, weights_only=True)["state_dict"]["network.head.fc2.weight"]).all()


def test_other_user_errors_are_one_line(small_single, tmp_path, capsys):
    case, h = small_single
    out = tmp_path / "o.ckpt"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    wrong_kind = tmp_path / "dual.json"
    wrong_kind.write_text(json.dumps({**hparams_of(case), "modelname": "TwoSeqMoEOrderFeature"}))
    bad_value = tmp_path / "badv.json"
    bad_value.write_text(json.dumps({**hparams_of(case), "num_heads": 5}))
    model = case.file("model.pt")
    for argv, words in [
        ((model, "--hparams", bad_json, "--output", out), ["not a JSON"]),
        ((model, "--hparams", tmp_path / "none.json", "--output", out), ["no such"]),
        ((tmp_path / "none.pt", "--hparams", h, "--output", out), ["no such file"]),
        ((model, "--output", out), ["--hparams"]),
        ((model, "--hparams", wrong_kind, "--output", out), ["holds a single model", "modelname", "dual"]),
        ((model, "--hparams", bad_value, "--output", out), ["hyperparameters", "num_heads"]),
        ((model, "--hparams", h, "--output", tmp_path / "no" / "dir.ckpt"), ["does not exist"]),
        ((model, "--to-legacy", "--output", out), ["not a Lightning checkpoint"]),
    ]:
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in err, (w, err)
    assert not out.exists()
    # a Lightning checkpoint given as a legacy source
    assert cli(capsys, model, "--hparams", h, "--output", out)[0] == 0
    code, _, err = cli(capsys, out, "--hparams", h, "--output", tmp_path / "x.ckpt")
    assert code == 2
    assert "--to-legacy" in err


# ---------------------------------------------------- SageMaker's model.tar.gz and hyperparameters.json
def test_tarball_and_string_hyperparameters_verify(tmp_path, capsys):
    """What a SageMaker job keeps: model.tar.gz ({test_name}.pt, its curve, score files) and a
    hyperparameters.json of strings with absent keys (train.py's defaults)."""
    from legacy_jobs import JobSpec, hyperparameters, legacy_model, make_tarball

    spec = JobSpec(use_moe=1, num_experts=2)
    buf = io.BytesIO()
    torch.save(legacy_model(spec).state_dict(), buf)
    tar = make_tarball(tmp_path / "model.tar.gz", {f"{spec.test_name}.pt": buf.getvalue(),
                                                   f"{spec.test_name}.pt.png": b"png", "score_file.csv": b"0.5\n"})
    h = tmp_path / "hp" / "hyperparameters.json"
    h.parent.mkdir()
    h.write_text(json.dumps(hyperparameters(spec)))
    out = tmp_path / "m.ckpt"
    code, stdout, err = cli(capsys, tar, "--hparams", h, "--output", out, "--verify")
    assert code == 0, err
    assert "verify: worst" in stdout and "OK" in stdout
    module = TemporalSelfAttentionClassification.load_from_checkpoint(out)
    assert module.config.num_experts == 2 and module.config.dropout == 0.1  # dropout: absent, train.py default
    # hyperparameters.json inside the tarball is found without --hparams
    tar2 = make_tarball(tmp_path / "with_hp.tar.gz", {f"{spec.test_name}.pt": buf.getvalue(),
                                                      "hyperparameters.json": h.read_bytes()})
    assert cli(capsys, tar2, "--output", tmp_path / "m2.ckpt")[0] == 0
    # a file that leaves n_layers_order to train.py's default (6) does not fit a 1-layer model
    h.write_text(json.dumps({k: v for k, v in hyperparameters(spec).items() if k != "n_layers_order"}))
    code, _, err = cli(capsys, tar, "--hparams", h, "--output", out)
    assert code == 2 and "n_layers_order = 6 (train.py's default" in err and len(err.strip().splitlines()) == 1


def test_hostile_tarball_is_refused(tmp_path, capsys):
    import tarfile

    from legacy_jobs import make_tarball

    link = tarfile.TarInfo("./model.pt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar = make_tarball(tmp_path / "model.tar.gz", {}, extra=[link])
    h = tmp_path / "h.json"
    h.write_text("{}")
    code, _, err = cli(capsys, tar, "--hparams", h, "--output", tmp_path / "x.ckpt")
    assert code == 2 and "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.ckpt").exists()


# ------------------------------------------------------------------------------------ --verify
def test_verify_passes_and_reports(small_single, tmp_path, capsys):
    case, h = small_single
    out = tmp_path / "v.ckpt"
    code, stdout, err = cli(capsys, case.file("ddp_checkpoint.pt"), "--hparams", h, "--output", out, "--verify")
    assert code == 0, err
    assert "verify: worst |legacy - port| =" in stdout
    assert "OK" in stdout
    assert out.exists()


def test_verify_fails_on_a_broken_conversion(small_single, tmp_path, capsys, monkeypatch):
    case, h = small_single
    wm = convert._weight_map()
    real = wm.legacy_to_port

    def broken(sd, config, kind=None):
        out = dict(real(sd, config, kind))
        out["head.fc2.bias"] = out["head.fc2.bias"] + 0.01
        return out

    monkeypatch.setattr(wm, "legacy_to_port", broken)
    out = tmp_path / "v.ckpt"
    code, stdout, err = cli(capsys, case.file("model.pt"), "--hparams", h, "--output", out, "--verify")
    assert code == 1
    assert "FAILED" in stdout
    assert "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------ resume vs the legacy loop
def _batches(case):
    """The trajectory protocol's 2 batches (first half / second half of the recorded inputs) in the
    legacy dataset dict format that both the legacy loop and the LightningModule read."""
    inp, n = case.inputs, case.inputs["y"].shape[0]
    sfx = ["_cid", "_ccid"] if case.kind == "dual" else [""]
    batch = {"y": inp["y"]}
    if inp.get("x_engineered") is not None:
        batch["x_engineered_num"] = inp["x_engineered"]
    for s in sfx:
        src = {"cat": f"x_seq_cat{s}", "num": f"x_seq_num{s}", "time": f"time_seq{s}"} if s else \
            {"cat": "x_cat", "num": "x_num", "time": "time_seq"}
        batch[f"x_seq_cat{s}"] = inp[src["cat"]]
        batch[f"x_seq_num{s}"] = inp[src["num"]]
        batch[f"time_to_last{s}"] = inp[src["time"]]
        batch[f"not_padded{s}"] = inp[f"not_padded{s}"]
    half = n // 2
    return [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]


@pytest.mark.parametrize("case", TRAINABLE)
def test_resume_training_checkpoint_matches_legacy_loop(case, tmp_path, capsys):
    import lightning as L

    from lightning_port.trainer import ReseedPerStep
    from lightning_port.weight_map import port_to_legacy
    from reference.training import make_optimizer, train_one_epoch

    ck = torch.load(case.file("train_checkpoint.pt"), weights_only=True)
    traj = case.trajectory
    steps_done = len(traj["loss"])
    batches = _batches(case)

    # legacy: resume the legacy loop for one more epoch (reseed 100 + global step before each step)
    legacy = legacy_model(case)
    legacy.load_state_dict(strip_module(ck["model"]))
    opt, sched = make_optimizer(legacy, lr=1e-5, scheduler_maxlr=1e-3, max_epoch=4)
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    legacy_lrs = []

    def before(step):
        legacy_lrs.append(opt.param_groups[0]["lr"])
        torch.manual_seed(100 + step)

    legacy_losses = train_one_epoch(legacy, batches, opt, torch.nn.CrossEntropyLoss(reduction="sum"),
                                    epoch=ck["epoch"] + 1, kind=case.kind, before_step=before,
                                    step_offset=steps_done)
    sched.step()

    # port: convert, then Trainer.fit(ckpt_path=OUT) for one more epoch
    h = write_hparams(tmp_path, case)
    out = tmp_path / "resume.ckpt"
    assert cli(capsys, case.file("train_checkpoint.pt"), "--hparams", h, "--output", out)[0] == 0

    class Record(L.Callback):
        losses, lrs, steps = [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            self.steps.append(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].item())

    rec = Record()
    module = CLASSES[case.kind].load_from_checkpoint(out)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[ReseedPerStep(100), rec], accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(out))

    assert rec.steps == [steps_done, steps_done + 1]
    assert trainer.current_epoch == 4
    assert trainer.global_step == steps_done + len(batches)
    assert rec.lrs == pytest.approx(legacy_lrs, rel=1e-12)
    torch.testing.assert_close(torch.tensor(rec.losses), torch.tensor(legacy_losses), atol=1e-4, rtol=1e-5)
    port_sched = trainer.lr_scheduler_configs[0].scheduler
    assert port_sched.last_epoch == sched.last_epoch
    assert port_sched.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-12)
    final = port_to_legacy({k: v for k, v in module.network.state_dict().items()}, module.config, case.kind)
    want = legacy.state_dict()
    config = module.config
    used = [k for k in want if k not in set(dropped_legacy_keys(config, case.kind))]
    for k in used:
        torch.testing.assert_close(final[k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    # the Adam moments (remapped by name) evolved identically: the lr of this last OneCycle epoch is
    # tiny, so compare the optimizer state itself, not only the weights (fp32 rounding noise of the
    # non-bit-exact port gradients is ~2e-4 relative; a wrong remap is O(1))
    port_params = dict(module.named_parameters())
    port_state = trainer.optimizers[0].state
    compared = 0
    for name, p in legacy.named_parameters():
        if p not in opt.state or not opt.state[p]:
            continue
        pp = port_params["network." + convert.legacy_key_to_port(name, kind=case.kind)]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(port_state[pp][key], opt.state[p][key], atol=1e-8, rtol=1e-3,
                                       msg=lambda m, name=name, key=key: f"{name} {key}: {m}")
        compared += 1
    assert compared == len(port_state) > 0
    worst_w = max((final[k] - want[k]).abs().max().item() for k in used if want[k].numel())
    worst_l = max(abs(a - b) for a, b in zip(rec.losses, legacy_losses))
    print(f"\nresume {case.name}: losses {rec.losses} vs legacy {legacy_losses}; worst loss diff {worst_l:.3g}, "
          f"worst weight diff {worst_w:.3g}, lrs {rec.lrs}")
