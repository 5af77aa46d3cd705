"""tsa-verify on legacy jobs built as legacy-tsa.md §12-§15 describe them (tests/legacy_jobs.py, which
does not use the code under test): single and dual, MoE and not, world size 1 and 2, channel data,
string hyperparameters with absent keys, model.tar.gz. Genuine jobs pass; planted faults fail with
the faulty rows named; hostile input is refused in one line (exit 2); the MoE criterion's false-alarm
rate and power are measured on simulated genuine files."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from legacy_jobs import JobSpec, build_job, legacy_model, legacy_scores, make_tarball

import parity.verify as V
from lightning_port.legacy_hparams import read_hyperparameters
from parity.verify import job as VJ
from parity.verify import order as VO
from parity.verify import scoring as VS
from reference.training import write_score_file

NO_MOE = JobSpec()  # single, no MoE, file order, float codes, (N, 1) labels
MOE_DUAL = JobSpec(kind="dual", use_moe=1, num_experts=3, world=2, epoch=5, weight_scale=5.0, float_codes=False,
                   labels_2d=False, test_name="isSmall_0_TwoSeqMoEOrderFeature", vali_rows=120, cali_rows=100)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = V.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def no_moe_job(tmp_path_factory):
    return build_job(tmp_path_factory.mktemp("no_moe"), NO_MOE)


@pytest.fixture(scope="module")
def moe_dual_job(tmp_path_factory):
    return build_job(tmp_path_factory.mktemp("moe_dual"), MOE_DUAL)


def rebuilt(job, tmp_path, score_name="score_file.csv", scores=None, lines=None):
    """The job's tarball again with one score file replaced (the legacy writer, or raw lines)."""
    d = tmp_path / "model"
    shutil.copytree(job.model_dir, d)
    if scores is not None:
        write_score_file(d / score_name, scores)
    if lines is not None:
        (d / score_name).write_text("".join(lines))
    shutil.copy(job.hparams, tmp_path / "hyperparameters.json")
    return make_tarball(tmp_path / "model.tar.gz", {p.name: p.read_bytes() for p in sorted(d.iterdir())})


# ---- genuine jobs pass --------------------------------------------------------------------------------
def test_single_no_moe_job_passes_with_report_and_plots(no_moe_job, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, no_moe_job.tarball, "--data-dir", no_moe_job.data, "--out", out)
    assert code == 0, stdout + err
    assert "PASS" in stdout
    r = json.loads((out / "report.json").read_text())
    assert r["verdict"] == "pass" and r["reasons"] == []
    assert r["model"]["model_file"] == f"{NO_MOE.test_name}.pt" and r["model"]["coin_flips"] is False
    assert r["hyperparameters"]["values"]["n_layers_order"] == 1
    assert set(NO_MOE.omit) <= set(r["hyperparameters"]["defaulted"])
    assert r["settings"]["batch_size"] == NO_MOE.batch_size  # the job's batch_size
    for split, n in (("vali", NO_MOE.vali_rows), ("cali", NO_MOE.cali_rows)):
        s = r["splits"][split]
        assert s["rows"] == n and s["layout"] == "channels"
        assert s["max_abs_diff"] <= 1e-5 and s["passed"]
        assert {"max_abs_diff", "p999_abs_diff", "auc", "operating_points", "worst_rows"} <= set(s)
        assert set(s["auc"]) == {"legacy", "port", "legacy_file"}
        assert [op["top"] for op in s["operating_points"]] == [0.001, 0.005, 0.01, 0.05]
        assert set(s["worst_rows"][0]) == {"row", "legacy", "port", "diff"}
        assert s["legacy_file"]["passed"] and s["legacy_file"]["max_abs_diff"] <= 1e-4
        assert s["tags"]["mismatches"] == 0
        for png in s["plots"]:
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
    pt = r["splits"]["cali"]["percentile_table"]
    assert pt["legacy_source"] == "percentile_score.pkl" and pt["legacy_file_consistent"]
    assert (out / "report.md").read_text().startswith("# tsa-verify: PASS")


def test_moe_dual_world_two_passes_and_finds_the_epoch(moe_dual_job, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, moe_dual_job.tarball, "--data-dir", moe_dual_job.data, "--world-size", 2,
                                "--out", tmp_path, "--no-plots")
    assert code == 0, stdout + err
    r = json.loads((tmp_path / "report.json").read_text())
    for split in ("vali", "cali"):
        s = r["splits"][split]
        assert "world size 2, epoch 5" in s["order"] and "tag_file.csv" in s["order"]
        assert s["max_abs_diff"] <= 1e-5  # same batches, same seeds: the coin flips included
        j = s["legacy_file"]["moe"]
        assert s["legacy_file"]["passed"] and j["draws"] == V.DEFAULT_MOE_SEEDS
        assert [p["policy"] for p in s["moe_policies"]] == ["threshold", "expected", "all", "none"]
    # the same command through python -m parity verify, one split, a few rows, the epoch given
    from parity.__main__ import main as parity_main

    assert parity_main(["verify", str(moe_dual_job.tarball), "--data-dir", str(moe_dual_job.data), "--world-size", "2",
                        "--epoch", "5", "--split", "cali", "--rows", "40", "--moe-seeds", "4", "--out",
                        str(tmp_path / "p"), "--no-plots"]) == 0
    assert json.loads((tmp_path / "p" / "report.json").read_text())["splits"]["cali"]["rows"] == 40


def test_world_size_one_job_is_in_sampler_order(tmp_path, capsys):
    """A one-GPU torchrun job still shuffles its evaluation (DistributedSampler with one replica)."""
    spec = JobSpec(use_moe=1, num_experts=1, world=1, epoch=2, vali_rows=80, cali_rows=64, omit=("use_moe", "num_experts"))
    job = build_job(tmp_path / "job", spec)
    folder = job.model_dir
    shutil.copy(job.hparams, folder / "hyperparameters.json")  # a folder SOURCE with the file inside
    code, stdout, err = run_cli(capsys, folder, "--data-dir", job.data, "--world-size", 1, "--out", tmp_path / "o",
                                "--no-plots")
    assert code == 0, stdout + err
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["model"]["moe"] and not r["model"]["coin_flips"]  # train.py's defaults: MoE with one expert
    assert "epoch 2" in r["splits"]["vali"]["order"]
    # claimed file order: the tag file says otherwise, the rows are named and the true order suggested
    code, stdout, _ = run_cli(capsys, folder, "--data-dir", job.data, "--out", tmp_path / "o2", "--no-plots",
                              "--split", "vali")
    assert code == 1
    r = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert r["splits"]["vali"]["tags"]["matching_order"] == "world size 1, epoch 2"
    assert not r["splits"]["vali"]["legacy_file"]["passed"]


# ---- planted faults fail with the rows named -------------------------------------------------------------
def test_score_lines_moved_by_a_hundredth(no_moe_job, tmp_path, capsys):
    scores = no_moe_job.scores["vali"][0].copy()
    moved = [5, 17, 93]
    scores[moved] += 0.01
    tar = rebuilt(no_moe_job, tmp_path, scores=scores)
    code, stdout, _ = run_cli(capsys, tar, "--data-dir", no_moe_job.data, "--split", "vali", "--out", tmp_path / "o",
                              "--no-plots")
    assert code == 1
    assert "data rows 5, 17, 93" in stdout
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    lf = r["splits"]["vali"]["legacy_file"]
    assert lf["rows_beyond_tolerance"] == 3
    assert sorted(w["row"] for w in lf["worst_rows"][:3]) == moved
    assert abs(lf["worst_rows"][0]["diff"] + 0.01) < 1e-6
    assert r["splits"]["vali"]["passed"]  # the legacy model and the port still agree


def test_rows_shifted_by_one(no_moe_job, tmp_path, capsys):
    lines = (no_moe_job.model_dir / "cali_score_file.csv").read_text().splitlines(keepends=True)
    tar = rebuilt(no_moe_job, tmp_path, "cali_score_file.csv", lines=lines[1:] + lines[:1])
    code, stdout, _ = run_cli(capsys, tar, "--data-dir", no_moe_job.data, "--split", "cali", "--out", tmp_path / "o",
                              "--no-plots")
    assert code == 1
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["splits"]["cali"]["legacy_file"]["rows_beyond_tolerance"] > NO_MOE.cali_rows // 2
    assert any("cali_score_file.csv differs" in x for x in r["reasons"])


def test_perturbed_port_weight(no_moe_job, tmp_path, capsys, monkeypatch):
    build = VS.build_models

    def perturbed(*a, **k):
        models = build(*a, **k)
        with torch.no_grad():
            models.port.network.head.fc2.bias[1] += 0.05
        return models

    monkeypatch.setattr(VJ, "build_models", perturbed)
    code, stdout, _ = run_cli(capsys, no_moe_job.tarball, "--data-dir", no_moe_job.data, "--split", "vali",
                              "--out", tmp_path, "--no-plots")
    assert code == 1
    r = json.loads((tmp_path / "report.json").read_text())
    s = r["splits"]["vali"]
    assert not s["passed"] and s["rows_beyond_tolerance"] == NO_MOE.vali_rows
    assert not s["legacy_file"]["passed"]
    assert any("differs from the legacy model" in x or "differ from the legacy model" in x or
               "port differs from the legacy model" in x for x in r["reasons"])


def test_moe_file_moved_on_three_percent_of_rows(moe_dual_job, tmp_path, capsys):
    scores = moe_dual_job.scores["vali"][0].copy()
    rng = np.random.default_rng(3)
    moved = np.sort(rng.choice(len(scores), 4, replace=False))  # 3 % of 120 lines (legacy DDP order)
    scores[moved] = np.clip(scores[moved] + rng.choice([-1, 1], 4) * rng.uniform(0.02, 0.03, 4), 0, 1)
    tar = rebuilt(moe_dual_job, tmp_path, scores=scores)
    code, stdout, _ = run_cli(capsys, tar, "--data-dir", moe_dual_job.data, "--world-size", 2, "--split", "vali",
                              "--out", tmp_path / "o", "--no-plots")
    assert code == 1, stdout
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    lf = r["splits"]["vali"]["legacy_file"]
    order = V.ddp_order(MOE_DUAL.vali_rows, 2, MOE_DUAL.epoch)[0]
    named = {w["row"] for w in lf["worst_rows"]}
    assert named and named <= set(order[moved].tolist())  # only moved rows are named


def test_claimed_world_size_disagrees_with_the_files(moe_dual_job, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, moe_dual_job.tarball, "--data-dir", moe_dual_job.data, "--split", "cali",
                              "--out", tmp_path, "--no-plots", "--moe-seeds", "4")
    assert code == 1
    assert "matches world size 2, epoch 5" in stdout
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["splits"]["cali"]["tags"]["mismatches"] > 0 and r["splits"]["cali"]["tags"]["rows"]


# ---- refused in one line ------------------------------------------------------------------------------------
def _refused(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_refusals(no_moe_job, tmp_path, capsys):
    tar, data = no_moe_job.tarball, no_moe_job.data
    hostile = make_tarball(tmp_path / "evil.tar.gz", {"x.pt": b"x"},
                           extra=[tarfile.TarInfo("./../../escape.csv")])
    assert "'..'" in _refused(capsys, hostile, "--data-dir", data, "--out", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"use_mlp": "0", "num_heads": "two"}))
    assert "num_heads" in _refused(capsys, tar, "--data-dir", data, "--hparams", bad, "--out", tmp_path)
    no_mlp = tmp_path / "no_mlp.json"
    no_mlp.write_text(json.dumps({k: v for k, v in json.loads(no_moe_job.hparams.read_text()).items() if k != "use_mlp"}))
    assert "could not have run" in _refused(capsys, tar, "--data-dir", data, "--hparams", no_mlp, "--out", tmp_path)
    assert "no such data folder" in _refused(capsys, tar, "--data-dir", tmp_path / "nope", "--out", tmp_path)
    err = _refused(capsys, tar, "--data-dir", data, "--world-size", 2, "--split", "vali", "--out", tmp_path)
    assert "tag_file.csv" in err and "no epoch" in err
    short = rebuilt(no_moe_job, tmp_path / "s", lines=["0.5\n"] * 3)
    assert "3 scores" in _refused(capsys, short, "--data-dir", data, "--out", tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    assert "looked for" in _refused(capsys, tar, "--data-dir", flat, "--out", tmp_path)


def test_plan_matches_the_hand_written_recipe():
    from legacy_jobs import legacy_order

    for n, world, epoch in [(10, 2, 0), (11, 2, 3), (13, 4, 7), (7, 8, 1), (5, 1, 2)]:
        plan = V.make_plan(n, 3, world, epoch)
        want, shares = legacy_order(n, world, epoch)
        assert plan.line_rows.tolist() == want.tolist()
        assert [b.rows.tolist() for b in plan.batches] == [s[i:i + 3].tolist() for s in shares
                                                           for i in range(0, len(s), 3)]
    plan = V.make_plan(10, 4)
    assert [len(b.rows) for b in plan.batches] == [4, 4, 2] and plan.line_rows.tolist() == list(range(10))
    # the fast search order (one permutation per epoch) is torch's DistributedSampler order
    for w, e, order in VO._gathered_orders(13, [1, 2, 3, 4, 8, 20], [0, 1, 9]):
        assert order.tolist() == V.ddp_order(13, w, e)[0].tolist(), (w, e)


# ---- the MoE criterion: false-alarm rate and power, on simulated genuine legacy files ---------------------
def test_moe_criterion_false_alarms_and_power(tmp_path):
    """Genuine legacy files (reference/ scoring with fresh RNG states verify never uses) must pass; the
    same files with 3 % of rows moved by 0.01-0.03 must fail. Nominal false-alarm bound: MOE_ALPHA per split."""
    spec = JobSpec(use_moe=1, num_experts=4, layers_order=2, layers_feature=2, weight_scale=5.0, vali_rows=200,
                   cali_rows=64)
    job = build_job(tmp_path, spec)
    hp = read_hyperparameters(job.hparams)
    models = VS.build_models(hp, torch.load(job.model_dir / f"{spec.test_name}.pt", weights_only=True), "x")
    data = VS.SplitData(job.data, "vali", spec.kind, "v0", hp)
    plan = V.make_plan(data.n, spec.batch_size)
    sc = VS.score_split(models, data, plan, 0, V.DEFAULT_MOE_SEEDS, 0, tmp_path, lambda n, close=False: None)
    anchors = np.stack([sc.policies["all"], sc.policies["threshold"]])
    model = legacy_model(spec, job.data)
    rng = np.random.default_rng(0)
    false_alarms, detected, trials, named, named_moved = 0, 0, 24, 0, 0
    with torch.no_grad():
        for m in range(trials):
            genuine, _ = legacy_scores(model, job.data, "vali", spec, 900_000 + 31 * m)
            false_alarms += not V.judge_moe(genuine, sc.draws, anchors).passed
            moved = genuine.copy()
            idx = rng.choice(len(moved), 6, replace=False)
            moved[idx] = np.clip(moved[idx] + rng.choice([-1, 1], 6) * rng.uniform(0.01, 0.03, 6), 0, 1)
            j = V.judge_moe(moved, sc.draws, anchors)
            if not j.passed:
                detected += 1
                top = j.exceed_rows[:3].tolist()  # the rows a report names first
                named += len(top)
                named_moved += len(set(top) & set(idx.tolist()))
    print(f"MoE criterion, {trials} simulated genuine files: {false_alarms} false alarms; moved 3 %: "
          f"{detected}/{trials} detected; {named_moved}/{named} of the rows named first were moved")
    assert false_alarms == 0
    assert detected >= 0.8 * trials
    assert named_moved >= 0.8 * named


def test_tsa_convert_and_tsa_score_on_the_job(no_moe_job, tmp_path, capsys):
    """tsa-convert takes the job's model.tar.gz and string hyperparameters; tsa-score reads its channel
    folders and writes the legacy score file (no coin flips, the job's batch size): the same rows, in the same
    format, the scores equal to fp32 rounding (the port sums in another order than the legacy)."""
    from lightning_port.convert import main as convert
    from lightning_port.serve import main as score

    ckpt = tmp_path / "m.ckpt"
    assert convert([str(no_moe_job.tarball), "--hparams", str(no_moe_job.hparams), "--output", str(ckpt)]) == 0
    assert score([str(ckpt), "--data-dir", str(no_moe_job.data), "--split", "vali", "--out", str(tmp_path),
                  "--batch-size", str(NO_MOE.batch_size)]) == 0
    capsys.readouterr()
    ours = (tmp_path / "score_file.csv").read_text().splitlines()
    legacy = (no_moe_job.model_dir / "score_file.csv").read_text().splitlines()
    assert len(ours) == len(legacy) > 0
    np.testing.assert_allclose(np.array(ours, dtype=np.float64), np.array(legacy, dtype=np.float64), rtol=0,
                               atol=1e-6)  # fp32 scores in [0, 1]: a few ulps of 0.5 (6e-8) measured


def test_dual_no_moe_flat_folder_passes(tmp_path, capsys):
    spec = JobSpec(kind="dual", test_name="isSmall_0_TwoSeq", vali_rows=70, cali_rows=50, float_codes=False,
                   labels_2d=False)
    job = build_job(tmp_path / "job", spec)
    flat = tmp_path / "flat"
    flat.mkdir()
    for split in ("vali", "cali"):
        for p in (job.data / split).iterdir():
            shutil.copy(p, flat / p.name)  # the same files in a flat folder
    code, stdout, err = run_cli(capsys, job.tarball, "--data-dir", flat, "--out", tmp_path / "o", "--no-plots")
    assert code == 0, stdout + err
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["model"]["kind"] == "dual" and r["splits"]["vali"]["layout"] == "flat"
    assert r["splits"]["cali"]["legacy_file"]["max_abs_diff"] <= 1e-4


def test_moe_rounding_boundary_recheck(moe_dual_job, tmp_path, capsys, monkeypatch):
    """Comparison (1) for MoE: a row that differs under one seed only (a coin at its rounding boundary) is
    re-scored with fresh seeds and excused; a difference that persists under them fails."""
    forward = VS._forward_port
    first = VS._seed(0, 0, 0, 0, 0)  # vali (split 0), draw 0, rank 0, batch 0

    def one_seed_only(module, batch, seed):
        out = forward(module, batch, seed)
        if seed == first:
            out[3] += 0.05
        return out

    monkeypatch.setattr(VS, "_forward_port", one_seed_only)
    args = (moe_dual_job.tarball, "--data-dir", moe_dual_job.data, "--world-size", 2, "--split", "vali",
            "--moe-seeds", 4, "--no-plots")
    code, stdout, _ = run_cli(capsys, *args, "--out", tmp_path / "a")
    r = json.loads((tmp_path / "a" / "report.json").read_text())
    row = int(V.make_plan(MOE_DUAL.vali_rows, MOE_DUAL.batch_size, 2, MOE_DUAL.epoch).batches[0].rows[3])
    assert r["splits"]["vali"]["coin_boundary_rows"] == [row] and r["splits"]["vali"]["passed"]

    def always(module, batch, seed):
        out = forward(module, batch, seed)
        out[3] += 0.05
        return out

    monkeypatch.setattr(VS, "_forward_port", always)
    code, stdout, _ = run_cli(capsys, *args, "--out", tmp_path / "b")
    r = json.loads((tmp_path / "b" / "report.json").read_text())
    assert code == 1 and not r["splits"]["vali"]["passed"] and r["splits"]["vali"]["coin_boundary_rows"] == []
    plan = V.make_plan(MOE_DUAL.vali_rows, MOE_DUAL.batch_size, 2, MOE_DUAL.epoch)
    assert r["splits"]["vali"]["rows_beyond_tolerance"] == len(plan.batches)  # row 3 of every batch
    assert {w["row"] for w in r["splits"]["vali"]["worst_rows"][:len(plan.batches)]} == {
        int(b.rows[3]) for b in plan.batches}


# ---- --train-epochs: the legacy train.py loop and Trainer.fit from the job's weights ---------------------------
TRAIN_JOB = JobSpec(train_rows=256)  # single, no MoE, channel folders; the job's batch 32, lr 5e-5, patience 3


@pytest.fixture(scope="module")
def train_job(tmp_path_factory):
    return build_job(tmp_path_factory.mktemp("train_job"), TRAIN_JOB)


def test_train_epochs_genuine_job_passes_with_curves(train_job, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, train_job.tarball, "--data-dir", train_job.data, "--train-epochs", 6,
                                "--out", out)
    assert code == 0, stdout + err
    assert "training:" in stdout and "5 of 5 comparisons within tolerance (pass)" in stdout
    r = json.loads((out / "report.json").read_text())
    t = r["training"]
    assert r["verdict"] == "pass" and t["passed"] and t["failed"] == []
    assert t["rows"] == {"train": 256, "vali": TRAIN_JOB.vali_rows, "cali": TRAIN_JOB.cali_rows}
    p = t["protocol"]  # the job's hyperparameters (tests/legacy_jobs.py writes them), max_epochs = N
    assert (p["batch_size"], p["lr"], p["scheduler_maxlr"], p["patience"], p["max_epochs"]) == (32, 5e-5, 5e-4, 3, 6)
    assert t["hyperparameters"]["max_epoch"]["value"] == 70 and "not the job's max_epoch 70" in t["training_notes"][0]
    assert set(t["comparisons"]) == {"convergence.train_loss", "convergence.vali_loss", "convergence.auc",
                                     "convergence.selection", "convergence.score_files"}
    for c in t["comparisons"].values():
        assert c["passed"] and c["values_compared"] > 0 and {"rtol", "atol", "reason"} <= set(c["tolerance"])
    n = t["epochs"][0]
    assert 1 <= n <= 6 and t["epochs"] == [n, n]
    for key in ("train_loss", "vali_loss", "auc_raw", "auc"):
        assert len(t[key]["legacy"]) == len(t[key]["port"]) == n
    assert t["best_epoch"][0] == t["best_epoch"][1] and t["stop_epoch"][0] == t["stop_epoch"][1]
    assert t["legacy_reference_run"] is False and t["max_legacy_reference_score_diff"] is None
    md = (out / "report.md").read_text()
    assert "## Training: up to 6 epoch(s) from the job's weights: pass" in md
    assert "![legacy loop vs Trainer.fit, per epoch](training_curves.png)" in md
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def _flat_copy(job, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for split in ("train", "vali", "cali"):
        for f in (job.data / split).iterdir():
            shutil.copy(f, flat / f.name)  # the same files in a flat folder
    return flat


def test_train_epochs_flat_rows_and_a_sabotaged_port_fails(train_job, tmp_path, capsys, monkeypatch):
    """--rows limits the training rows too (flat layout here); Adam's beta2 0.99 on the port side only (the legacy
    trains with 0.999) fails the verdict, naming the training comparison."""
    from lightning_port.module import TemporalSelfAttentionClassification as Module

    flat = _flat_copy(train_job, tmp_path)
    args = (train_job.tarball, "--data-dir", flat, "--train-epochs", 2, "--rows", 100, "--no-plots")
    code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "ok")
    assert code == 0, stdout + err
    t = json.loads((tmp_path / "ok" / "report.json").read_text())["training"]
    assert t["rows"] == {"train": 100, "vali": 100, "cali": 100} and "first 100 rows of" in t["data"]
    assert t["passed"] and t["plot"] is None

    configure = Module.configure_optimizers

    def beta2_099(self):
        self.hparams.beta2 = 0.99
        return configure(self)

    monkeypatch.setattr(Module, "configure_optimizers", beta2_099)
    code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "bad")
    assert code == 1, stdout + err
    r = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert r["verdict"] == "fail" and "convergence.train_loss" in r["training"]["failed"]
    assert all(s["passed"] for s in r["splits"].values())  # the scoring proof still passes: only training fails
    assert any(x.startswith("training: convergence.train_loss beyond tolerance") for x in r["reasons"])
    assert "FAIL: training: convergence.train_loss" in stdout
    assert "## Training: up to 2 epoch(s) from the job's weights: FAIL" in (tmp_path / "bad" / "report.md").read_text()


def test_train_epochs_moe_runs_the_legacy_reference(tmp_path, capsys):
    """MoE with 2 experts: the legacy loop runs again with another thread count and the report says so."""
    spec = JobSpec(use_moe=1, num_experts=2, train_rows=96, vali_rows=64, cali_rows=64)
    job = build_job(tmp_path / "job", spec)
    code, stdout, err = run_cli(capsys, job.tarball, "--data-dir", job.data, "--train-epochs", 2, "--split", "cali",
                                "--moe-seeds", 2, "--no-plots", "--out", tmp_path / "o")
    assert code == 0, stdout + err
    t = json.loads((tmp_path / "o" / "report.json").read_text())["training"]
    assert t["legacy_reference_run"] and t["seconds"]["legacy_reference"] is not None
    assert t["max_legacy_reference_score_diff"] is not None
    assert any("value-dependent routing" in n for n in t["training_notes"])


def test_train_epochs_refusals(train_job, tmp_path, capsys):
    tar, data = train_job.tarball, train_job.data
    assert "--train-epochs must be >= 0, got -1" in _refused(capsys, tar, "--data-dir", data, "--train-epochs", -1,
                                                             "--out", tmp_path)
    no_train = tmp_path / "no_train"
    shutil.copytree(data, no_train, ignore=shutil.ignore_patterns("train*"))
    err = _refused(capsys, tar, "--data-dir", no_train, "--train-epochs", 1, "--out", tmp_path)
    assert "needs the job's train split" in err and "looked for" in err
