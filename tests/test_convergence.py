"""The legacy train.py loop of reference/ (legacy_fit) and the convergence comparison of parity/convergence.py.

Small configurations: a 4-wide model on 96 training rows; a few seconds each.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import reference.training as R
from lightning_port.synth import SynthConfig, write_dataset
from parity.convergence import (
    ConvergenceResult,
    Curves,
    Protocol,
    auc_tolerance,
    compare_convergence,
    convergence_figure,
    legacy_decisions,
    run_convergence,
)
from parity.rng import seeded
from reference import build_model

KW = {"n_cat_features": 3, "n_num_features": 2, "n_classes": 2, "n_embedding": 12, "seq_len": 4,
      "n_engineered_num_features": 2, "dim_embedding_table": 4, "dim_attn_feedforward": 8, "use_mlp": 0,
      "num_heads": 1, "dropout": 0.1, "n_layers_order": 1, "n_layers_feature": 1, "emb_tbl_use_bias": 1,
      "use_moe": False, "num_experts": 1, "use_time_seq": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    write_dataset(d, SynthConfig(kind="single", rows=96, eval_rows=64, seq_len=4, n_cat=3, n_num=2, n_eng=2,
                                 n_embedding=12, seed=3))
    return d


def legacy_batches(data, split, batch_size=32):
    ds = R.LegacyDataset(R.load_split(data, split, layout="flat"))  # tsa-synth writes the flat layout
    return list(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False))


def scripted_fit(data, tmp_path, monkeypatch, aucs, max_epoch, patience=1):
    """legacy_fit with the validation AUC replaced by a recorded sequence (the rest is the real loop)."""
    script = iter(aucs)
    monkeypatch.setattr(R, "legacy_auc", lambda labels, scores: next(script))
    with seeded(0):
        model = build_model("single", **KW)
    train = legacy_batches(data, "train")
    return R.legacy_fit(model, lambda epoch: train, legacy_batches(data, "vali"), legacy_batches(data, "cali"),
                        tmp_path, lr=1e-3, scheduler_maxlr=1e-2, max_epoch=max_epoch, patience=patience)


def test_legacy_fit_reloads_the_strict_best_after_the_stop_flag(data, tmp_path, monkeypatch):
    # rounded: .6 .7 .7 .65 -> best epoch 1 (epoch 2 ties: kept earlier), the tie resets the counter,
    # epoch 3 is below: counter 1 = patience -> flag; read at the top of epoch 4: reload epoch 1, score, write
    run = scripted_fit(data, tmp_path, monkeypatch, [0.60001, 0.70004, 0.69996, 0.65], max_epoch=6)
    assert [e.auc for e in run.epochs] == [0.6, 0.7, 0.7, 0.65]
    assert [e.saved_best for e in run.epochs] == [True, True, False, False]
    assert [e.es_counter for e in run.epochs] == [0, 0, 0, 1]
    assert (run.best_epoch, run.flag_epoch, run.early_stopped, len(run.epochs)) == (1, 3, True, 4)
    # the reloaded weights are epoch 1's: eval is deterministic without MoE, so its scores come back exactly
    np.testing.assert_array_equal(run.vali_scores, run.epochs[1].vali_scores)
    assert not np.array_equal(run.vali_scores, run.epochs[3].vali_scores)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.pt", "checkpoint.pt", "score_file.csv", "tag_file.csv", "cali_score_file.csv", "cali_tag_file.csv",
         "percentile_score.pkl"])
    assert len(pickle.loads((tmp_path / "percentile_score.pkl").read_bytes())) == 1000
    # checkpoint.pt (the early-stopping file) was overwritten by the tie at epoch 2: not the best model
    best, es = (torch.load(tmp_path / n, weights_only=True) for n in ("model.pt", "checkpoint.pt"))
    assert any(not torch.equal(best[k], es[k]) for k in best)


def test_legacy_fit_writes_nothing_when_the_flag_comes_at_the_last_epoch(data, tmp_path, monkeypatch):
    run = scripted_fit(data, tmp_path, monkeypatch, [0.6, 0.7, 0.65], max_epoch=3)
    assert (run.flag_epoch, run.early_stopped, run.vali_scores) == (2, False, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "model.pt"]


def test_legacy_decisions_on_ties():
    assert legacy_decisions([0.5, 0.6, 0.6, 0.6, 0.59, 0.6, 0.58, 0.57], patience=2) == (1, 7)
    assert legacy_decisions([0.5, 0.6, 0.6], patience=1) == (1, None)


def test_auc_tolerance_counts_the_pairs_the_differences_can_swap():
    legacy = np.array([0.10, 0.20, 0.30, 0.50])
    labels = np.array([0, 1, 0, 1])  # pairs (pos, neg): (.2,.1) (.2,.3) (.5,.1) (.5,.3)
    port = legacy + np.array([0.0, 0.06, 0.0, 0.0])  # only the .2 positive moved, by .06
    # pairs within |d_pos| + |d_neg| = .06: (.2,.3) is .1 apart: none; (.2,.1) is .1 apart: none
    assert auc_tolerance(legacy, port, labels) == 0.0
    port = legacy + np.array([0.0, 0.1, 0.0, 0.0])  # now both (.2,.1) and (.2,.3) lie within .1
    assert auc_tolerance(legacy, port, labels) == 2 / 4


def _pair(seed=0, **port_options):
    from lightning_port import TemporalSelfAttentionClassification
    from lightning_port.weight_map import legacy_to_port

    with seeded(seed):
        legacy = build_model("single", **KW)
    port = TemporalSelfAttentionClassification(**KW, **port_options)
    port.network.load_state_dict(legacy_to_port(legacy.state_dict(), port.config, "single"))
    return legacy, port


PROTOCOL = Protocol(max_epochs=5, patience=1, batch_size=32, lr=1e-3, scheduler_maxlr=1e-2, data_seed=3)


def test_run_convergence_agrees_and_catches_a_planted_optimizer_bug(data, tmp_path):
    legacy, port = _pair()
    res = run_convergence(legacy, port, data, "single", PROTOCOL, tmp_path / "ok", label="tiny",
                          reference_threads=None)
    assert res.legacy.epochs == res.port.epochs >= 1
    for name in ("convergence.train_loss", "convergence.vali_loss", "convergence.auc"):
        assert res.comparisons[name].passed, res.comparisons[name].report()
    assert res.legacy.step_lrs == pytest.approx(res.port.step_lrs, rel=1e-12)
    # the same run with Adam's beta2 0.99 instead of the legacy 0.999 on the port side
    legacy, port = _pair(beta2=0.99)
    bad = run_convergence(legacy, port, data, "single", PROTOCOL, tmp_path / "bad", reference_threads=None)
    train = bad.comparisons["convergence.train_loss"]
    assert not train.passed
    assert train.mismatches[0].path.startswith("train_loss[epoch") or "step" in train.mismatches[0].path
    # a port whose selection disagrees with its own AUCs is caught (the legacy rules on the port's AUCs)
    bad.port.best_epoch = (bad.port.best_epoch or 0) + 1
    assert not compare_convergence(bad)["convergence.selection"].passed
    fig = convergence_figure([res, bad])
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def _fake_curves(scores):
    return Curves(step_losses=[3.0, 2.0, 1.5, 1.4], step_lrs=[1e-3] * 4, train_loss=[2.5, 1.45], vali_loss=[5.0, 4.0],
                  auc_raw=[0.75, 0.74], auc=[0.75, 0.74], epoch_scores=[np.asarray(scores, np.float32)] * 2,
                  vali_labels=np.array([0, 1, 0, 1]), best_epoch=0, stop_epoch=1)


def test_report_links_the_curves_png_and_lists_the_runs(tmp_path):
    import json

    from parity.report import CheckRecord, write_reports
    from parity.tolerances import Tolerance

    res = ConvergenceResult(_fake_curves([0.2, 0.6, 0.4, 0.9]), _fake_curves([0.2, 0.6, 0.4, 0.9]),
                            Protocol(max_epochs=3, patience=1), 2, 4, "fake run")
    res.comparisons = compare_convergence(res)
    rec = CheckRecord.new("convergence.selection", "convergence", "single:x", Tolerance(0, 0, "exact"))
    rec.add(res.comparisons["convergence.selection"])
    jpath, mpath = write_reports(tmp_path, [rec], [], {"profile": "test"}, [res])
    assert (tmp_path / "convergence_curves.png").stat().st_size > 10_000
    assert "![legacy loop vs Trainer.fit, per epoch](convergence_curves.png)" in mpath.read_text()
    runs = json.loads(jpath.read_text())["convergence_runs"]
    assert runs[0]["label"] == "fake run" and runs[0]["stop_epoch"] == [1, 1]


def test_rounded_auc_differences_are_explained_only_within_the_auc_tolerance():
    same = [0.2, 0.6, 0.4, 0.9]
    L, P = _fake_curves(same), _fake_curves(same)
    P.auc = [0.75, 0.7401]  # a rounding that is not round(raw, 4)
    res = ConvergenceResult(L, P, Protocol(max_epochs=3, patience=1), 2, 4, "x")
    sel = compare_convergence(res)["convergence.selection"]
    assert not sel.passed and "port rounded AUC 0.7401 at epoch 1 is not round(0.74, 4)" in sel.report()
    # raw AUCs 6e-5 apart although no score moved (AUC tolerance 1e-12): a wrong AUC, not a rounding boundary
    P.auc_raw = [0.75, 0.74006]
    assert "rounded AUC at epoch 1: port 0.7401 vs legacy 0.74" in compare_convergence(res)["convergence.selection"].report()
    assert not compare_convergence(res)["convergence.auc"].passed
    # the same raw difference with a port score that moved enough to swap a pair: a rounding boundary, noted
    P.epoch_scores = [P.epoch_scores[0], np.asarray([0.2, 0.6, 0.65, 0.9], np.float32)]
    res.notes = ""
    comps = compare_convergence(res)
    assert comps["convergence.selection"].passed and comps["convergence.auc"].passed
    assert "a rounding boundary lies between them" in res.notes


def test_card_path_flip_is_explained_only_between_values_that_agree():
    from parity.convergence import card_path_flip

    L, P = _fake_curves([0.2, 0.6, 0.4, 0.9]), _fake_curves([0.2, 0.6, 0.4, 0.9])
    L.gates = {("train", 0): np.array([0.3, 0.0], np.float32), ("train", 3): np.array([0.0500001, 0.2], np.float32)}
    P.gates = {("train", 0): np.array([0.3, 0.0], np.float32), ("train", 3): np.array([0.0499999, 0.2], np.float32)}
    res = ConvergenceResult(L, P, Protocol(max_epochs=3, patience=1), 2, 4, "x")
    epoch, desc, explained = card_path_flip(res)
    assert (epoch, explained) == (1, True) and "training step 3, row(s) [0]" in desc  # step 3 of 2 per epoch
    res.comparisons = compare_convergence(res)
    assert res.horizon == 1 and "compared up to epoch 1" in res.notes
    P.gates[("train", 3)] = np.array([0.01, 0.2], np.float32)  # the port's gate is simply different
    assert card_path_flip(res)[2] is False
    assert "beyond the step tolerance" in compare_convergence(res)["convergence.selection"].report()
