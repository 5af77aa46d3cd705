"""Scoring a split twice, batched as the legacy job batched it: by the legacy model (``reference/``, fed
by the legacy data loader) and by the port converted in memory (fed by :mod:`lightning_port.data`), with
the same seed before each batch; for MoE models with coin flips also K port draws with fresh seeds and
the deterministic policies."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..compare import within
from .judging import MODEL_TOL
from .options import VerifyError
from .order import Plan

DRAWS_IN_MEMORY_BYTES = 256 << 20  # above this the MoE draws go to a memory-mapped file
RECHECK_SEEDS = 2  # MoE comparison (1): fresh seed pairs for rows beyond tolerance
MAX_RECHECK_BATCHES = 64


@dataclass
class Models:
    kind: str
    reference: torch.nn.Module
    port: torch.nn.Module
    policies: dict[str, torch.nn.Module]  # deterministic MoE policies (MoE models with coin flips)
    coin_flips: bool


def build_models(hp: Any, legacy_sd: dict[str, torch.Tensor], source: str) -> Models:
    """The legacy model (``reference/``) and the port converted in memory, both in eval mode."""
    import reference
    from lightning_port.config import DETERMINISTIC_POLICIES
    from lightning_port.convert import ConvertError, build_module, legacy_to_lightning
    from lightning_port.serving.export import with_overrides

    kind = hp.kind
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference.build_model(kind, **hp.constructor_kwargs())
        try:
            ref.load_state_dict(legacy_sd, strict=True)
        except RuntimeError as e:
            raise VerifyError(f"{source}: the legacy model rejects the weights ({str(e).splitlines()[0]})") from None
        try:
            ckpt, _ = legacy_to_lightning(legacy_sd, hp.module_kwargs(), source=source)
        except ConvertError as e:
            raise VerifyError(str(e)) from None
        port = build_module(kind, ckpt["hyper_parameters"])
        port.load_state_dict(ckpt["state_dict"], strict=True)
        policies = {}
        if hp.uses_moe:
            policies = {p: with_overrides(port, moe_eval_policy=p) for p in DETERMINISTIC_POLICIES}
    return Models(kind, ref.eval(), port.eval(), policies, hp.uses_moe)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class SplitScores:
    reference: np.ndarray  # (n_slots,) legacy model, draw 0 seeds
    draws: np.ndarray  # (K, n_slots) port; draws[0] uses the legacy model's seeds
    policies: dict[str, np.ndarray]
    slots_scored: np.ndarray  # (n_slots,) bool


def _expected_dims(hp: Any) -> tuple[Any, str]:
    """The feature counts the model's hyperparameters fix, and where they come from (for the data reader)."""
    from lightning_port.data import SplitDims

    want = SplitDims(n_cat=hp["n_cat_features"], n_num=hp["n_num_features"], seq_len=hp["seq_len"],
                     n_eng=hp["n_engineered_num_features"])
    keys = ("n_cat_features", "n_num_features", "seq_len", "n_engineered_num_features", "n_embedding")
    absent = [k for k in keys if k not in hp.explicit]
    where = f"the model's hyperparameters, {hp.source}" + (
        f"; absent there, so train.py's defaults: {', '.join(absent)}" if absent else "")
    return want, where


class SplitData:
    """One split read twice: by the legacy loader (for ``reference/``) and by :mod:`lightning_port.data` (port)."""

    def __init__(self, data_dir: Path, split: str, kind: str, version: str, hp: Any):
        from lightning_port.data import DataError, TSANumpyDataset, load_split
        from reference.training import LegacyDataset
        from reference.training import load_split as legacy_load_split

        try:
            loaded = load_split(data_dir, split, kind, version, n_embedding=hp["n_embedding"],
                                n_num_features=hp["n_num_features"], expected=[_expected_dims(hp)])
        except DataError as e:
            raise VerifyError(str(e)) from None
        self.layout = loaded.layout
        self.files = loaded.files
        self.port = TSANumpyDataset(loaded, kind)
        # legacy side: the legacy reader of the same files (read-only map: the legacy's "r+" needs write access)
        self.legacy = LegacyDataset(legacy_load_split(data_dir, split, version, kind, layout=loaded.layout,
                                                      mmap_mode="r"))
        self.y = np.asarray(loaded.arrays["y"]).reshape(-1).astype(np.int64)
        self.n = len(self.y)

    def legacy_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        from torch.utils.data import default_collate

        return default_collate([self.legacy[int(i)] for i in rows])  # legacy DataLoader: one row at a time

    def port_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self.port.__getitems__(rows.tolist())


def _positive(scores: torch.Tensor) -> np.ndarray:
    return torch.softmax(scores.float(), dim=1)[:, -1].numpy().astype(np.float32)


def _forward_reference(model: torch.nn.Module, batch: dict, kind: str, seed: int) -> np.ndarray:
    from reference.training import model_inputs

    args, kwargs = model_inputs(batch, kind)
    torch.manual_seed(seed)
    return _positive(model(*args, **kwargs)[0])


def _forward_port(module: torch.nn.Module, batch: dict, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return _positive(module(*module.batch_to_args(batch))[0])


def score_split(models: Models, data: SplitData, plan: Plan, split_index: int, k_draws: int, base_seed: int,
                workdir: Path, progress: Callable[[int], None]) -> SplitScores:
    S = plan.n_slots
    ref = np.full(S, np.nan, np.float32)
    if k_draws * S * 4 > DRAWS_IN_MEMORY_BYTES:
        draws = np.lib.format.open_memmap(workdir / f"draws_{split_index}.npy", mode="w+", dtype=np.float32,
                                          shape=(k_draws, S))
        draws[:] = np.nan
    else:
        draws = np.full((k_draws, S), np.nan, np.float32)
    policies = {p: np.full(S, np.nan, np.float32) for p in models.policies}
    scored = np.zeros(S, dtype=bool)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in plan.batches:
            sl = slice(b.slot, b.slot + len(b.rows))
            lb, pb = data.legacy_batch(b.rows), data.port_batch(b.rows)
            s0 = _seed(base_seed, split_index, 0, b.rank, b.index)
            ref[sl] = _forward_reference(models.reference, lb, models.kind, s0)
            draws[0, sl] = _forward_port(models.port, pb, s0)
            for k in range(1, k_draws):
                draws[k, sl] = _forward_port(models.port, pb, _seed(base_seed, split_index, k, b.rank, b.index))
            for p, m in models.policies.items():
                policies[p][sl] = _forward_port(m, pb, s0)
            scored[sl] = True
            progress(1)
    return SplitScores(ref, draws, policies, scored)


def recheck_rows(models: Models, data: SplitData, plan: Plan, split_index: int, beyond_slots: np.ndarray,
                 base_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MoE with coin flips: re-score the batches holding rows beyond tolerance in comparison (1) with
    fresh seed pairs. A coin whose uniform draw lands within rounding of its keep threshold (g2 / 0.2)
    can fall either way when two fp32 implementations round g2 differently, moving that row's score;
    such a row agrees again under other seeds, a real difference does not. Returns the slots that
    agree under every recheck ("boundary") and those that do not ("persistent")."""
    hit = {b.rank * 10**9 + b.index: b for b in plan.batches
           if np.any((beyond_slots >= b.slot) & (beyond_slots < b.slot + len(b.rows)))}
    if len(hit) > MAX_RECHECK_BATCHES:
        return np.zeros(0, np.int64), beyond_slots
    agree = np.ones(len(beyond_slots), dtype=bool)
    with torch.inference_mode(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in hit.values():
            inside = (beyond_slots >= b.slot) & (beyond_slots < b.slot + len(b.rows))
            pos = beyond_slots[inside] - b.slot
            lb, pb = data.legacy_batch(b.rows), data.port_batch(b.rows)
            for r in range(1, RECHECK_SEEDS + 1):
                s = _seed(base_seed, split_index, 10**6 + r, b.rank, b.index)
                a = _forward_reference(models.reference, lb, models.kind, s)[pos]
                c = _forward_port(models.port, pb, s)[pos]
                agree[inside] &= within(c, a, MODEL_TOL)
    return beyond_slots[agree], beyond_slots[~agree]
