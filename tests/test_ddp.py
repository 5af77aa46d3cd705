"""DDP with 2 CPU processes (gloo) through the ``tsa`` console script: fit, then test with the
ScoreWriter gathering both ranks' rows back into file order."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TSA = Path(sys.executable).with_name("tsa")
TSA_SYNTH = Path(sys.executable).with_name("tsa-synth")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
           "PL_DISABLE_FORK": "1"}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)  # a clean launch, whatever launched pytest
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.mark.ddp
def test_ddp_two_cpu_processes_fit_and_test(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip(reason="torch.distributed with gloo is not available")
    data, out = tmp_path / "data", tmp_path / "out"
    _run([str(TSA_SYNTH), "--kind", "single", "--out", str(data), "--rows", "256", "--eval-rows", "101"], tmp_path)
    common = [
        "--config", str(ROOT / "configs" / "single_synthetic.yaml"),
        "--data.data_dir", str(data), "--data.batch_size", "32",
        "--trainer.default_root_dir", str(out), "--trainer.progress_bar", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
    ]
    fit = _run([str(TSA), "fit", *common, "--trainer.max_epochs", "1"], tmp_path)
    assert "best checkpoint" in fit.stdout
    run = out / "tsa" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    ck = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 4, "256 rows / (2 ranks x 32) = 4 steps: each rank took half the epoch"

    _run([str(TSA), "test", *common, "--ckpt_path", "last"], tmp_path)
    scores = np.loadtxt(run / "score_file.csv", dtype=np.float32)
    tags = np.loadtxt(run / "tag_file.csv", dtype=np.int64)
    # 101 rows: the distributed sampler pads one rank with a repeat; the writer drops it, keeps file order
    assert scores.shape == (101,)
    np.testing.assert_array_equal(tags, np.load(data / "vali_Y_v0.npy"))


# ---- the trainer factory (strategies, precision, callbacks) ------------------------------------
def test_fsdp_wraps_the_attention_stacks_and_layers():
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_port import nn as tsa_nn
    from lightning_port.trainer import fsdp_wrap_classes, make_strategy

    classes = fsdp_wrap_classes()
    assert {tsa_nn.OrderAttentionModule, tsa_nn.FeatureAttentionModule, tsa_nn.AttentionLayerPostNorm,
            tsa_nn.AttentionLayerPreNorm} <= classes
    assert fsdp_wrap_classes(("NoSuchClass",)) == set()  # absent names are tolerated
    assert isinstance(make_strategy("fsdp"), FSDPStrategy)


def test_build_trainer_callbacks_and_options(tmp_path):
    from lightning.pytorch.callbacks import (
        DeviceStatsMonitor,
        EarlyStopping,
        LearningRateMonitor,
        ModelCheckpoint,
    )
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_port.scoring import ScoreWriter
    from lightning_port.trainer import ReseedPerStep, build_trainer

    t = build_trainer(
        accelerator="cpu", devices=1, strategy="ddp", precision="bf16-mixed", gradient_clip_val=0.5,
        accumulate_grad_batches=2, patience=4, device_stats=True, reseed_per_step=3, default_root_dir=str(tmp_path),
    )
    kinds = {type(c) for c in t.callbacks}
    assert {ModelCheckpoint, EarlyStopping, LearningRateMonitor, DeviceStatsMonitor, ScoreWriter, ReseedPerStep} <= kinds
    ck = t.checkpoint_callback
    assert (ck.monitor, ck.mode, ck.save_last) == ("val/auroc", "max", True)
    es = next(c for c in t.callbacks if isinstance(c, EarlyStopping))
    assert (es.monitor, es.patience) == ("val/auroc", 4)
    assert isinstance(t.strategy, DDPStrategy)
    assert t.strategy._ddp_kwargs.get("find_unused_parameters") is True
    assert t.gradient_clip_val == 0.5
    assert t.accumulate_grad_batches == 2
    assert t.precision == "bf16-mixed"
    assert isinstance(t.logger, TensorBoardLogger)
    assert t.logger.root_dir == str(tmp_path / "tsa")
    plain = build_trainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path))
    assert plain.gradient_clip_val is None, "legacy: no clipping by default"
