"""Legacy SageMaker jobs built the way legacy-tsa.md §12-§15 describe them, WITHOUT the code under test.

Nothing here imports ``lightning_port``: the data are written with numpy into SageMaker channel
folders (``DATA/vali/vali_X_seq_cat_v0.npy``, float codes, (N, 1) labels where asked), the
hyperparameters as SageMaker stores them (string values, absent keys), the model is
``reference/``'s state_dict saved as ``{test_name}.pt`` next to a ``{test_name}.pt.png`` training
curve, and the score files come from ``reference/`` scoring the data with the legacy loader, in the
legacy order (the DistributedSampler recipe of §12 written out by hand here: permutation of
``Generator().manual_seed(epoch)``, padded with its head, ``padded[r::world]`` per rank, each rank's
share batched by ``batch_size``, gathered rank-major, cut to N), written by ``reference.training``'s
legacy writers. All packed into ``model.tar.gz`` with ``tarfile`` (``./name`` members and the ``.``
directory entry, like SageMaker's).
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import reference
from reference.training import LegacyDataset, evaluate, write_score_files
from reference.training import load_split as legacy_load_split

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # stand-in for the training-curve plot


@dataclass
class JobSpec:
    kind: str = "single"
    use_moe: int = 0
    num_experts: int = 1
    n_cat: int = 5
    n_num: int = 3
    n_eng: int = 2
    n_embedding: int = 30
    seq_len: int = 6
    dim: int = 8
    ff: int = 16
    heads: int = 2
    layers_order: int = 1
    layers_feature: int = 1
    vali_rows: int = 150
    cali_rows: int = 120
    train_rows: int = 64
    batch_size: int = 32
    world: int | None = None  # None: a single-process job (file order); N: torchrun with N GPUs
    epoch: int = 3  # the DistributedSampler epoch of the final evaluation
    test_name: str = "isSmall_0_OrderFeature"
    init_seed: int = 7
    data_seed: int = 11
    legacy_rng_seed: int = 424242  # the legacy process's RNG state at scoring: never one verify uses
    weight_scale: float = 1.0  # scale the classifier head (spreads scores, and coin-flip effects, over [0, 1])
    float_codes: bool = True
    labels_2d: bool = True
    # keys left out of hyperparameters.json: train.py's defaults (§15) apply and are the true values here
    omit: tuple[str, ...] = ("n_classes", "dropout", "emb_tbl_use_bias", "use_time_seq", "max_epoch")
    extra: dict = field(default_factory=dict)


def hyperparameters(spec: JobSpec) -> dict[str, str]:
    """SageMaker's hyperparameters.json: every value a string, plus unrelated keys; the keys in
    ``spec.omit`` are absent (their train.py default must then be the true value)."""
    h = {
        "modelname": "OrderFeature" if spec.kind == "single" else "TwoSeqMoEOrderFeature",
        "n_cat_features": str(spec.n_cat), "n_num_features": str(spec.n_num), "n_embedding": str(spec.n_embedding),
        "seq_len": str(spec.seq_len), "n_classes": "2", "n_engineered_num_features": str(spec.n_eng),
        "dim_embedding_table": str(spec.dim), "dim_attn_feedforward": str(spec.ff), "num_heads": str(spec.heads),
        "n_layers_order": str(spec.layers_order), "n_layers_feature": str(spec.layers_feature),
        "emb_tbl_use_bias": "1", "dropout": "0.1", "use_time_seq": "1", "use_moe": str(spec.use_moe),
        "num_experts": str(spec.num_experts), "use_mlp": "0", "lr": "5e-05", "scheduler_maxlr": "0.0005",
        "max_epoch": "70", "patience": "3", "batch_size": str(spec.batch_size), "test_name": spec.test_name,
        "sagemaker_program": "train.py", "sagemaker_submit_directory": "s3://bucket/code/sourcedir.tar.gz",
        "sagemaker_region": '"us-east-1"',
    }
    if spec.kind == "dual":
        h["num_seq"] = "2"
    for k in spec.omit:
        h.pop(k, None)
    h.update(spec.extra)
    return h


def constructor_kwargs(spec: JobSpec) -> dict:
    kw = dict(n_cat_features=spec.n_cat, n_num_features=spec.n_num, n_classes=2, n_embedding=spec.n_embedding,
              seq_len=spec.seq_len, n_engineered_num_features=spec.n_eng, dim_embedding_table=spec.dim,
              dim_attn_feedforward=spec.ff, num_heads=spec.heads, dropout=0.1, n_layers_order=spec.layers_order,
              n_layers_feature=spec.layers_feature, emb_tbl_use_bias=1, use_moe=bool(spec.use_moe),
              num_experts=spec.num_experts, use_time_seq=True)
    if spec.kind == "single":
        kw["use_mlp"] = 0
    return kw


def legacy_model(spec: JobSpec, data_dir: Path | None = None) -> torch.nn.Module:
    """The legacy model at its seeded initial weights; ``weight_scale`` stretches the classifier head
    (and recentres its bias on the train split) so that scores spread over (0, 1) like a trained
    model's and the MoE coin flips move them by realistic amounts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = reference.build_model(spec.kind, seed=spec.init_seed, **constructor_kwargs(spec))
    model.eval()
    if spec.weight_scale != 1.0:
        with torch.no_grad():
            model.clf[3].weight.mul_(spec.weight_scale)
            if data_dir is not None:
                arrays = legacy_load_split(data_dir, "train", kind=spec.kind)
                batch = torch.utils.data.default_collate([LegacyDataset(arrays)[i] for i in range(len(arrays["y"]))])
                from reference.training import model_inputs

                args, kwargs = model_inputs(batch, spec.kind)
                torch.manual_seed(0)
                logits = model(*args, **kwargs)[0]
                model.clf[3].bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return model


def _sequence(rng, n, spec, card=False):
    L = spec.seq_len
    lengths = rng.integers(1, L + 1, size=n)
    if card:
        lengths[rng.random(n) < 0.3] = 1
    real = (np.arange(L)[None, :] >= (L - lengths)[:, None]).astype(np.float32)  # left padded
    codes = rng.integers(1, spec.n_embedding - spec.n_num + 1, size=(n, L, spec.n_cat)).astype(np.float32)
    cat = codes * real[..., None]
    num = np.zeros((n, L, spec.n_num + 2), np.float32)
    num[..., : spec.n_num] = rng.normal(size=(n, L, spec.n_num)) * real[..., None]
    gaps = rng.exponential(2e5, size=(n, L)).astype(np.float32)
    t = np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1] - gaps[:, -1:]  # time_to_last, 0 at the current transaction
    num[..., -2] = t * real
    num[..., -1] = real
    return cat, num


def write_data(root: Path, spec: JobSpec) -> dict[str, int]:
    """SageMaker channels ``root/{split}/{split}_..._v0.npy`` for train (small), vali and cali."""
    rng = np.random.default_rng(spec.data_seed)
    rows = {"train": spec.train_rows, "vali": spec.vali_rows, "cali": spec.cali_rows}
    for split, n in rows.items():
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        seqs = [""] if spec.kind == "single" else ["_cid", "_ccid"]
        for s in seqs:
            cat, num = _sequence(rng, n, spec, card=s == "_ccid")
            np.save(d / f"{split}{s}_X_seq_cat_v0.npy", cat if spec.float_codes else cat.astype(np.int32))
            np.save(d / f"{split}{s}_X_seq_num_v0.npy", num)
        np.save(d / f"{split}_X_num_v0.npy", rng.normal(size=(n, spec.n_eng)).astype(np.float32))
        y = (rng.random(n) < 0.3).astype(np.float32 if spec.labels_2d else np.int64)
        np.save(d / f"{split}_Y_v0.npy", y.reshape(n, 1) if spec.labels_2d else y)
    return rows


def legacy_order(n: int, world: int | None, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """§12 by hand: the rank shares and the rank-major gather cut to n (file order without DDP)."""
    if world is None:
        return np.arange(n), [np.arange(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0 + epoch)).numpy()
    total = -(-n // world) * world
    padded = np.concatenate([perm, np.resize(perm, total - n)]) if total > n else perm
    shares = [padded[r::world] for r in range(world)]
    return np.concatenate(shares)[:n], shares


def legacy_scores(model, data_dir: Path, split: str, spec: JobSpec, rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The legacy evaluation: each rank scores its share in batches, one global RNG per process."""
    arrays = legacy_load_split(data_dir, split, kind=spec.kind)  # legacy reader: channel folders, mmap r+
    n = len(arrays["y"])
    order, shares = legacy_order(n, spec.world, spec.epoch)
    ds = LegacyDataset(arrays)
    gathered_s, gathered_y = [], []
    for r, share in enumerate(shares):
        torch.manual_seed(rng_seed + 1000 * r)  # each rank's own generator, state unrecorded
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, share.tolist()), batch_size=spec.batch_size)
        s, y, _ = evaluate(model, loader, kind=spec.kind)
        gathered_s.append(s)
        gathered_y.append(y)
    scores = np.concatenate(gathered_s)[:n]
    labels = np.concatenate(gathered_y)[:n]
    assert np.array_equal(labels, np.asarray(arrays["y"]).reshape(-1)[order])
    return scores.astype(np.float32), labels


@dataclass
class Job:
    spec: JobSpec
    root: Path
    data: Path
    tarball: Path
    hparams: Path
    model_dir: Path
    scores: dict  # split -> (scores, labels) as written


def build_job(root: Path, spec: JobSpec, *, rng_seed: int | None = None, tamper=None, data: Path | None = None) -> Job:
    """A whole legacy job under ``root``: ``data/`` (channels), ``model/`` (model_dir) and
    ``model.tar.gz``, ``hyperparameters.json`` beside the tarball. ``tamper(split, scores) -> scores``
    plants a fault in the score files before they are written. ``data``: an existing channel-layout
    folder with the spec's feature counts (e.g. ``tsa-synth --layout channels``) instead of ``data/``."""
    root.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = root / "data"
        write_data(data, spec)
    model = legacy_model(spec, data)
    model_dir = root / "model"
    model_dir.mkdir(exist_ok=True)
    torch.save(model.state_dict(), model_dir / f"{spec.test_name}.pt")
    (model_dir / f"{spec.test_name}.pt.png").write_bytes(PNG)
    seed = spec.legacy_rng_seed if rng_seed is None else rng_seed
    with torch.no_grad():
        vs, vy = legacy_scores(model, data, "vali", spec, seed)
        cs, cy = legacy_scores(model, data, "cali", spec, seed + 7)
    if tamper is not None:
        vs, cs = tamper("vali", vs.copy()), tamper("cali", cs.copy())
    write_score_files(model_dir, vs, vy, cs, cy)  # the legacy writers (score/tag files, percentile_score.pkl)
    hp = root / "hyperparameters.json"
    hp.write_text(json.dumps(hyperparameters(spec), indent=1))
    tarball = root / "model.tar.gz"
    make_tarball(tarball, {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())})
    return Job(spec, root, data, tarball, hp, model_dir, {"vali": (vs, vy), "cali": (cs, cy)})


def make_tarball(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> Path:
    """Like SageMaker's ``tar -czf model.tar.gz -C model_dir .``: a ``.`` entry and ``./name`` members."""
    with tarfile.open(path, "w:gz") as tar:
        d = tarfile.TarInfo(".")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path
