"""End to end: tsa-synth -> tsa fit (3 epochs) -> tsa test / predict with the best checkpoint.

Leaves under the root dir the best and last checkpoints, TensorBoard event files, the legacy score
files, a 1000-row percentile table and the PNGs; best val/auroc >= 0.7 (single and dual).
Runs in-process (``lightning_port.cli.main``) to save interpreter start-up; the console scripts
themselves run in test_ddp.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_port.cli import main as tsa
from lightning_port.synth import main as tsa_synth

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

ROOT = Path(__file__).resolve().parents[1]
ROWS = "1500"  # the demo uses 4000; fewer keeps the suite fast and still clears 0.7


def best_score(ckpt_dir: Path) -> float:
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    scores = [v["best_model_score"] for k, v in state.items() if "val/auroc" in k and v.get("best_model_score") is not None]
    return float(scores[0])


@pytest.mark.parametrize("kind", ["single", "dual"])
def test_synth_fit_test_predict(tmp_path, kind, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    assert tsa_synth(["--kind", kind, "--out", str(data), "--rows", ROWS, "--eval-rows", "400"]) == 0
    common = [
        "--config", str(ROOT / "configs" / f"{kind}_synthetic.yaml"),
        "--data.data_dir", str(data),
        "--trainer.default_root_dir", str(out),
        "--trainer.progress_bar", "false",
    ]
    tsa(["fit", *common, "--trainer.max_epochs", "3"])
    run = out / "tsa" / "version_0"
    ckpts = run / "checkpoints"
    best = list(ckpts.glob("best-*.ckpt"))
    assert len(best) == 1
    assert (ckpts / "last.ckpt").is_file()
    auroc = best_score(ckpts)
    print(f"{kind}: best val/auroc {auroc:.4f}")
    assert auroc >= 0.7

    tsa(["test", *common, "--ckpt_path", str(best[0])])
    tsa(["predict", *common, "--ckpt_path", "best"])  # alias resolved from the root dir
    printed = capsys.readouterr().out
    assert "score_file.csv" in printed
    assert "percentile_score.pkl" in printed

    assert list(run.glob("events.out.tfevents.*"))
    for name in ("score_file.csv", "tag_file.csv", "cali_score_file.csv", "cali_tag_file.csv",
                 "roc_pr_curves.png", "score_distribution.png", "cali_score_distribution.png", "hparams.yaml"):
        assert (run / name).is_file(), name
    scores = np.loadtxt(run / "score_file.csv", dtype=np.float32)
    tags = np.loadtxt(run / "tag_file.csv", dtype=np.int64)
    assert scores.shape == tags.shape == (400,)
    assert ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_array_equal(tags, np.load(data / "vali_Y_v0.npy"))
    table = pickle.loads((run / "percentile_score.pkl").read_bytes())
    assert len(table) == 1000
    assert [r[1] for r in table[:2]] == [0.0, 0.001]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(tags, scores) >= 0.7


def test_kind_follows_model_and_max_epochs_synced(tmp_path):
    data = tmp_path / "data"
    tsa_synth(["--kind", "dual", "--out", str(data), "--rows", "64", "--eval-rows", "64"])
    from lightning_port.cli import TSACLI

    cli = TSACLI(
        args=["--config", str(ROOT / "configs" / "dual_synthetic.yaml"), "--data.data_dir", str(data),
              "--data.kind", "null", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "o")],
        run=False,
    )
    assert cli.datamodule.kind == "dual"
    assert cli.model.hparams.max_epochs == 2
    assert cli.datamodule.n_embedding == 40  # taken from the model for code validation


def test_best_alias_without_runs_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tsa(["test", "--config", str(ROOT / "configs" / "single_synthetic.yaml"),
             "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "best"])
    assert "no best-*.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["single_synthetic", "dual_synthetic", "legacy_layout", "production"])
def test_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as info:
        tsa(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_port." in printed
    assert "data_dir:" in printed


# ---- a user's mistake: one line naming the file or key, exit 2 ------------------------------------------
def _one_line_error(capsys, argv) -> str:
    code = tsa(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tsa: error:") or "Traceback" in ln]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_user_mistakes_are_one_line(tmp_path, capsys):
    cfg = ["--config", str(ROOT / "configs" / "single_synthetic.yaml"), "--trainer.default_root_dir",
           str(tmp_path / "o"), "--trainer.max_epochs", "1", "--trainer.progress_bar", "false"]
    msg = _one_line_error(capsys, ["fit", *cfg, "--data.data_dir", str(tmp_path / "missing")])
    assert f"{tmp_path}/missing/train_X_seq_cat_v0.npy" in msg and "train/train_X_seq_cat_v0.npy" in msg
    data = tmp_path / "data"
    tsa_synth(["--out", str(data), "--rows", "64", "--eval-rows", "64", "--layout", "channels"])
    capsys.readouterr()
    bad = np.load(data / "vali" / "vali_X_num_v0.npy")
    bad[9, 0] = np.nan
    np.save(data / "vali" / "vali_X_num_v0.npy", bad)
    msg = _one_line_error(capsys, ["fit", *cfg, "--data.data_dir", str(data)])
    assert "vali/vali_X_num_v0.npy" in msg and "NaN" in msg and "row 9" in msg
    msg = _one_line_error(capsys, ["fit", *cfg, "--data.data_dir", str(data), "--model.init_args.dropout", "1.5"])
    assert "dropout" in msg
    with pytest.raises(SystemExit) as info:
        tsa(["fit", *cfg, "--data.data_dir", str(data), "--data.batch_size", "abc"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "data.batch_size" in err and len(err.strip().splitlines()) == 1, err


def test_fit_in_bf16_mixed_on_cpu(tmp_path):
    # issue 21: `tsa fit --trainer.precision bf16-mixed` on the CPU, Lightning's own plugin (autocast bfloat16, fp32
    # master weights, no scaler); the fit learns as the fp32 one does (parity `precision.fit_auroc` compares the two)
    import yaml

    data, out = tmp_path / "data", tmp_path / "out"
    assert tsa_synth(["--kind", "single", "--out", str(data), "--rows", ROWS, "--eval-rows", "400"]) == 0
    seen = []
    real = torch.autocast.__enter__

    def spy(self):
        seen.append((self.device, self.fast_dtype))
        return real(self)

    torch.autocast.__enter__ = spy
    try:
        tsa(["fit", "--config", str(ROOT / "configs" / "single_synthetic.yaml"), "--data.data_dir", str(data),
             "--trainer.default_root_dir", str(out), "--trainer.progress_bar", "false",
             "--trainer.max_epochs", "3", "--trainer.precision", "bf16-mixed"])
    finally:
        torch.autocast.__enter__ = real
    assert ("cpu", torch.bfloat16) in seen  # the forward ran under CPU bf16 autocast
    run = out / "tsa" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == "bf16-mixed"
    ckpts = run / "checkpoints"
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # fp32 master weights
    assert best_score(ckpts) >= 0.7
