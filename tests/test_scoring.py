"""Legacy-compatible score files, percentile table, plots, and the ScoreWriter callback."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from tsa_standin import StandInTSA

from lightning_port.data import TSADataModule
from lightning_port.scoring import (
    ScoreWriter,
    percentile_table,
    positive_scores,
    read_score_file,
    roc_pr_figure,
    score_distribution_figure,
    write_percentile_table,
    write_score_file,
    write_tag_file,
)
from lightning_port.synth import SynthConfig, write_dataset


# ---- the legacy writers, as legacy utilities.py wrote them (legacy-tsa.md §12) ----------------------
def legacy_write_scores(path, probs):
    scores = probs[:, -1]
    with open(path, "w") as f:
        for v in scores:
            f.write(str(np.float32(v)) + "\n")


def legacy_write_tags(path, labels):
    with open(path, "w") as f:
        for v in labels:
            f.write(str(int(v)) + "\n")


def legacy_write_percentiles(path, cali_scores):
    cali = np.asarray(cali_scores, dtype=np.float32)
    with open(path, "wb") as f:
        pickle.dump([[np.percentile(cali, 100 * k / 1000), k / 1000] for k in range(1000)], f)


@pytest.fixture
def probs():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 4, size=(257, 2)).astype(np.float32))
    p = torch.softmax(logits, dim=-1)
    extra = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1 - 1e-8, 1e-8], [0.3, 0.7]], dtype=torch.float32)
    return torch.cat([p, extra])


def test_score_and_tag_files_byte_identical(tmp_path, probs):
    labels = np.arange(len(probs)) % 2
    legacy_write_scores(tmp_path / "legacy_score.csv", probs.numpy())
    legacy_write_tags(tmp_path / "legacy_tag.csv", labels)
    write_score_file(tmp_path / "score_file.csv", positive_scores(probs))
    write_tag_file(tmp_path / "tag_file.csv", torch.from_numpy(labels))
    assert (tmp_path / "score_file.csv").read_bytes() == (tmp_path / "legacy_score.csv").read_bytes()
    assert (tmp_path / "tag_file.csv").read_bytes() == (tmp_path / "legacy_tag.csv").read_bytes()
    text = (tmp_path / "score_file.csv").read_text()
    assert not text.startswith("score")
    assert text.count("\n") == len(probs)
    np.testing.assert_array_equal(read_score_file(tmp_path / "score_file.csv"), probs[:, -1].numpy())


def test_percentile_table_byte_identical(tmp_path, probs):
    scores = positive_scores(probs)
    legacy_write_percentiles(tmp_path / "legacy.pkl", scores)
    write_percentile_table(tmp_path / "percentile_score.pkl", scores)
    assert (tmp_path / "percentile_score.pkl").read_bytes() == (tmp_path / "legacy.pkl").read_bytes()
    table = pickle.loads((tmp_path / "percentile_score.pkl").read_bytes())
    assert len(table) == 1000
    assert table[0][1] == 0.0
    assert table[999][1] == 0.999
    assert table[0][0] == scores.min()
    with pytest.raises(ValueError, match="no calibration scores"):
        percentile_table([])


def test_figures_are_figures(probs):
    s = positive_scores(probs)
    y = (np.arange(len(s)) % 3 == 0).astype(int)
    assert isinstance(roc_pr_figure(s, y), Figure)
    assert isinstance(score_distribution_figure(s, y), Figure)
    assert isinstance(roc_pr_figure(s, np.zeros_like(y)), Figure)  # one class: no curve, no crash


def test_score_writer_test_and_predict(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, SynthConfig(kind="single", rows=128, eval_rows=100, seed=4))
    dm = TSADataModule(str(data), batch_size=32, eval_batch_size=24)
    model = StandInTSA()
    writer = ScoreWriter()
    logger = pl.loggers.TensorBoardLogger(tmp_path / "logs", name="tsa")
    trainer = pl.Trainer(
        max_epochs=1, logger=logger, callbacks=[writer], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.test(model, datamodule=dm)
    out = logger.log_dir
    for name in ("score_file.csv", "tag_file.csv", "roc_pr_curves.png", "score_distribution.png"):
        assert (tmp_path / "logs" / "tsa" / "version_0" / name).is_file(), name
    vali_y = np.load(data / "vali_Y_v0.npy")
    tags = np.loadtxt(f"{out}/tag_file.csv", dtype=np.int64)
    np.testing.assert_array_equal(tags, vali_y)  # file order, all 100 rows
    model.eval()
    with torch.no_grad():
        batch = dm._dataset("vali").__getitems__(list(range(100)))
        expected = torch.softmax(model(batch), -1)[:, -1].numpy()
    np.testing.assert_allclose(read_score_file(f"{out}/score_file.csv"), expected, rtol=1e-6, atol=1e-7)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = set()
    for events in Path(out).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        images |= set(acc.Tags()["images"])
    assert {"test/roc_pr_curves", "test/score_distribution"} <= images

    trainer.predict(model, datamodule=dm)
    table = pickle.loads(Path(out, "percentile_score.pkl").read_bytes())
    assert len(table) == 1000
    assert len(read_score_file(f"{out}/cali_score_file.csv")) == 100
    np.testing.assert_array_equal(np.loadtxt(f"{out}/cali_tag_file.csv", dtype=np.int64), np.load(data / "cali_Y_v0.npy"))
    assert (tmp_path / "logs" / "tsa" / "version_0" / "cali_score_distribution.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs" / "tsa" / "version_0").iterdir())
