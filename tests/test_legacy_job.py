"""legacy_job: SageMaker hyperparameters, the state_dict check, the SOURCE reader (hostile tarballs
included), the legacy score files and the restricted percentile-table unpickler."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import tempfile

import numpy as np
import pytest
import torch
from legacy_jobs import JobSpec, hyperparameters, legacy_model, make_tarball, write_data

from lightning_port.legacy_job import (
    TRAIN_PY,
    LegacyJobError,
    check_state_dict,
    coerce_hyperparameters,
    open_job,
    read_hyperparameters,
    read_percentile_table,
    read_score_file,
    read_tag_file,
)
from reference.training import load_split as legacy_load_split
from reference.training import write_percentile_table

SPEC = JobSpec()


# ---- hyperparameters ---------------------------------------------------------------------------
def test_sagemaker_strings_absent_keys_and_unrelated_keys():
    raw = hyperparameters(SPEC)
    assert all(isinstance(v, str) for v in raw.values())
    hp = read_hyperparameters(raw)
    assert hp["n_cat_features"] == 5 and isinstance(hp["n_cat_features"], int)
    assert hp["lr"] == 5e-5 and isinstance(hp["lr"], float)
    assert hp["modelname"] == "OrderFeature" and hp.kind == "single"
    # absent keys take train.py's defaults (legacy-tsa §15), not the constructor's
    for key in SPEC.omit:
        assert key not in raw
        assert hp[key] == TRAIN_PY[key][1]
    assert "train.py's default" in hp.origin("dropout")
    assert "sagemaker_program" in hp.ignored and "sagemaker_region" in hp.ignored


def test_train_py_defaults_of_an_empty_file_are_section_15():
    hp = read_hyperparameters({"use_mlp": "0"})
    want = {"n_cat_features": 53, "n_num_features": 47, "n_embedding": 1352, "seq_len": 51, "n_classes": 2,
            "n_engineered_num_features": 0, "dim_embedding_table": 128, "dim_attn_feedforward": 64, "num_heads": 1,
            "n_layers_order": 6, "n_layers_feature": 6, "emb_tbl_use_bias": 1, "dropout": 0.1, "use_time_seq": 1,
            "use_moe": 1, "num_experts": 1, "modelname": "OrderFeature", "loss": "CrossEntropyLoss",
            "loss_reduction": "mean", "lr": 1e-5, "scheduler_maxlr": 1e-3, "max_epoch": 70, "patience": 10,
            "batch_size": 1024, "use_amp": 0, "seed": 0}
    assert {k: hp[k] for k in want} == want
    assert not hp.uses_moe  # one expert: the second expert is never kept, no coin flips


def test_double_quoted_values_of_older_sdks():
    hp = read_hyperparameters({"modelname": '"TwoSeqMoEOrderFeature"', "num_seq": '"2"', "n_cat_features": '"7"',
                               "dropout": '"0.2"'})
    assert hp.kind == "dual" and hp["n_cat_features"] == 7 and hp["dropout"] == 0.2


def test_typed_values_are_accepted():
    hp = read_hyperparameters({"use_mlp": 0, "use_moe": True, "num_experts": 3, "n_layers_order": 2.0, "lr": 1})
    assert hp["use_moe"] == 1 and hp["n_layers_order"] == 2 and hp["lr"] == 1.0


@pytest.mark.parametrize(("values", "words"), [
    ({"num_heads": "two"}, ["num_heads", "'two'", "integer"]),
    ({"dropout": "high"}, ["dropout", "number"]),
    ({"lr": "nan"}, ["lr", "finite"]),
    ({"n_layers_order": "1.5"}, ["n_layers_order", "integer"]),
    ({"use_moe": "true"}, ["use_moe", "integer"]),
    ({"use_moe": "2"}, ["use_moe", "0 or 1"]),
    ({"modelname": "Transformer"}, ["modelname", "OrderFeature"]),
    ({"modelname": "TwoSeqMoEOrderFeature", "num_seq": "1"}, ["num_seq", "modelname"]),
    ({"dropout": "1.5"}, ["dropout", "[0, 1)"]),
    ({"num_experts": "0"}, ["num_experts", ">= 1"]),
    ({"n_cat_features": [1, 2]}, ["n_cat_features"]),
])
def test_bad_values_are_one_line_naming_the_key(values, words):
    with pytest.raises(LegacyJobError) as info:
        read_hyperparameters({"use_mlp": "0", **values}, where="hp.json")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("hp.json: ")
    for w in words:
        assert w in msg, (w, msg)


def test_use_mlp_absent_or_one_could_not_have_run():
    with pytest.raises(LegacyJobError, match="use_mlp is absent.*train.py's default 1.*could not have run"):
        read_hyperparameters({"n_cat_features": "5"})
    with pytest.raises(LegacyJobError, match="use_mlp = 1: the legacy model cannot build it"):
        read_hyperparameters({"use_mlp": "1"})
    # the dual constructor has no use_mlp: train.py's default does not matter there
    assert read_hyperparameters({"modelname": "TwoSeqMoEOrderFeature"}).kind == "dual"


def test_json_file_errors(tmp_path):
    p = tmp_path / "hyperparameters.json"
    p.write_text("{not json")
    with pytest.raises(LegacyJobError, match="not a JSON file"):
        read_hyperparameters(p)
    p.write_text("[1, 2]")
    with pytest.raises(LegacyJobError, match="flat JSON object"):
        read_hyperparameters(p)
    p.write_text(json.dumps({"HyperParameters": {"use_mlp": "0", "seq_len": "9"}}))  # DescribeTrainingJob answer
    assert read_hyperparameters(p)["seq_len"] == 9


def test_coerce_keeps_other_keys_and_absent_keys():
    out = coerce_hyperparameters({"n_cat_features": "5", "moe_eval_policy": "threshold", "use_moe": True})
    assert out == {"n_cat_features": 5, "moe_eval_policy": "threshold", "use_moe": 1}


def test_from_config_reads_strings_and_keeps_constructor_defaults():
    from lightning_port import TemporalSelfAttentionClassification

    m = TemporalSelfAttentionClassification.from_config(
        {"n_cat_features": "5", "n_num_features": "3", "n_embedding": "30", "seq_len": '"6"', "use_moe": "0"})
    assert m.config.n_cat_features == 5 and m.config.seq_len == 6 and m.config.use_moe is False
    assert m.config.n_layers_order == 1  # absent: the constructor's default (a typed config, not a SageMaker file)
    with pytest.raises(ValueError, match="config: n_num_features"):
        TemporalSelfAttentionClassification.from_config({"n_cat_features": 5, "n_num_features": "x"})


# ---- state_dict vs hyperparameters ---------------------------------------------------------------
def test_state_dict_check_names_the_disagreeing_key():
    sd = legacy_model(SPEC).state_dict()
    hp = read_hyperparameters(hyperparameters(SPEC))
    check_state_dict(hp, sd)  # agrees
    wrong_hp = {k: v for k, v in hyperparameters(SPEC).items() if k != "n_layers_order"}
    wrong = read_hyperparameters({**wrong_hp, "n_engineered_num_features": "3", "dim_embedding_table": "16"})
    with pytest.raises(LegacyJobError) as info:
        check_state_dict(wrong, sd, "model.pt")
    msg = str(info.value)
    assert "\n" not in msg
    assert "n_layers_order = 6 (train.py's default: n_layers_order is absent" in msg
    assert "order_attention.layer_stack.0.*" in msg
    assert "n_engineered_num_features = 3" in msg and "dim_embedding_table = 16" in msg
    moe = read_hyperparameters({**hyperparameters(SPEC), "use_moe": "1", "num_experts": "3"})
    with pytest.raises(LegacyJobError, match="use_moe = 1 .* but .*feedforward.0.weight is present"):
        check_state_dict(moe, sd)
    dual = read_hyperparameters({**hyperparameters(SPEC), "modelname": "TwoSeqMoEOrderFeature"})
    with pytest.raises(LegacyJobError, match="holds a single model but modelname"):
        check_state_dict(dual, sd)


# ---- legacy outputs --------------------------------------------------------------------------------
def test_score_and_tag_files(tmp_path):
    p = tmp_path / "score_file.csv"
    p.write_text("0.25\n0.33333334\nnan\n")
    s = read_score_file(p)
    assert s.dtype == np.float32 and s[1] == np.float32(1 / 3) and np.isnan(s[2])
    p.write_text("0.25\nabc\n")
    with pytest.raises(LegacyJobError, match="score_file.csv.*one score per line"):
        read_score_file(p)
    t = tmp_path / "tag_file.csv"
    t.write_text("0\n1\n1\n")
    assert read_tag_file(t).tolist() == [0, 1, 1]
    t.write_text("0\n0.5\n")
    with pytest.raises(LegacyJobError, match="line 2"):
        read_tag_file(t)


def test_percentile_table_restricted_unpickler(tmp_path):
    good = tmp_path / "percentile_score.pkl"
    cali = np.random.default_rng(0).random(500).astype(np.float32)
    write_percentile_table(good, cali)  # the legacy writer
    table = read_percentile_table(good)
    assert table.shape == (1000, 2) and table[990, 1] == 0.99
    # float64 scalars and protocol 2 (older jobs) read too
    old = tmp_path / "old.pkl"
    old.write_bytes(pickle.dumps([[np.float64(i / 1000), i / 1000] for i in range(1000)], protocol=2))
    assert read_percentile_table(old)[5, 0] == 0.005

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/TSA_PWNED_MARKER_PKL",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([[Evil(), 0.0]]))
    with pytest.raises(LegacyJobError, match="refused: global .*system is not allowed"):
        read_percentile_table(evil)
    assert not os.path.exists("/tmp/TSA_PWNED_MARKER_PKL")
    short = tmp_path / "short.pkl"
    short.write_bytes(pickle.dumps([[0.1, 0.0]]))
    with pytest.raises(LegacyJobError, match="1 rows; expected 1000"):
        read_percentile_table(short)


# ---- SOURCE: folder, file, model.tar.gz -------------------------------------------------------------
def _model_files(spec=SPEC) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save(legacy_model(spec).state_dict(), buf)
    return {f"{spec.test_name}.pt": buf.getvalue(), f"{spec.test_name}.pt.png": b"png", "score_file.csv": b"0.5\n",
            "tag_file.csv": b"1\n"}


def _leftovers() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("tsa-legacy-job-")}


def test_tarball_like_sagemakers_is_read_and_cleaned_up(tmp_path):
    files = _model_files()
    tar = make_tarball(tmp_path / "model.tar.gz", files)
    (tmp_path / "hyperparameters.json").write_text(json.dumps(hyperparameters(SPEC)))
    before = _leftovers()
    with open_job(tar) as job:
        assert job.source_kind == "tarball" and job.model_name == f"{SPEC.test_name}.pt"
        assert job.hparams_where == "beside SOURCE"
        assert set(job.outputs) == {"score_file.csv", "tag_file.csv"}
        assert f"{SPEC.test_name}.pt.png" in job.extras
        folder = job.model.parent
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert sorted(p.name for p in folder.iterdir()) == sorted(["score_file.csv", "tag_file.csv",
                                                                   f"{SPEC.test_name}.pt"])  # only what is needed
    assert not folder.exists() and _leftovers() == before


def test_model_choice_in_a_folder(tmp_path):
    files = _model_files()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / f"{SPEC.test_name}_1700000000_checkpoint.pt").write_bytes(b"x")
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with open_job(tmp_path) as job:  # the single plain state_dict by legacy naming
        assert job.model_name == f"{SPEC.test_name}.pt" and job.hparams is None
    (tmp_path / "other.pt").write_bytes(b"x")
    with pytest.raises(LegacyJobError, match="several candidate models .*isSmall_0_OrderFeature.pt, other.pt"), \
            open_job(tmp_path):
        pass
    (tmp_path / "hyperparameters.json").write_text(json.dumps(hyperparameters(SPEC)))  # test_name picks it
    with open_job(tmp_path) as job:
        assert job.model_name == f"{SPEC.test_name}.pt" and job.hparams_where == "inside SOURCE"
    with open_job(tmp_path, test_name="other") as job:
        assert job.model_name == "other.pt"


def _member(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(("member", "words"), [
    (_member("./evil.pt", tarfile.SYMTYPE, "/etc/passwd"), ["symbolic link", "./evil.pt"]),
    (_member("./hard.csv", tarfile.LNKTYPE, "score_file.csv"), ["hard link"]),
    (_member("/tmp/TSA_PWNED_ABS", tarfile.REGTYPE), ["absolute path"]),
    (_member("./../../TSA_PWNED_DOTDOT", tarfile.REGTYPE), ["'..'"]),
    (_member("./dev", tarfile.CHRTYPE), ["a device"]),
    (_member("./blk", tarfile.BLKTYPE), ["a device"]),
    (_member("./fifo", tarfile.FIFOTYPE), ["a fifo"]),
])
def test_hostile_tarballs_are_refused_in_one_line(tmp_path, member, words):
    tar = make_tarball(tmp_path / "model.tar.gz", _model_files(), extra=[member])
    before = _leftovers()
    with pytest.raises(LegacyJobError) as info, open_job(tar):
        pass
    msg = str(info.value)
    assert "\n" not in msg and "refused" in msg
    for w in words:
        assert w in msg
    assert not os.path.exists("/tmp/TSA_PWNED_ABS") and _leftovers() == before


def test_damaged_tarball(tmp_path):
    tar = make_tarball(tmp_path / "model.tar.gz", _model_files())
    tar.write_bytes(tar.read_bytes()[:200])
    with pytest.raises(LegacyJobError, match="damaged|not a readable tar"), open_job(tar):
        pass


# ---- the legacy data loader reads SageMaker channels -------------------------------------------------
def test_reference_loader_reads_channel_folders(tmp_path):
    write_data(tmp_path, SPEC)
    arrays = legacy_load_split(tmp_path, "vali")  # legacy: f"{data_dir}/vali/vali_..."
    assert arrays["y"].shape == (SPEC.vali_rows,)
    assert arrays["x_seq_num"].shape == (SPEC.vali_rows, SPEC.seq_len, SPEC.n_num)
    with pytest.raises(FileNotFoundError, match="vali_X_num_v0.npy"):
        legacy_load_split(tmp_path, "vali", layout="flat")
