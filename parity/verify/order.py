"""The legacy job's order (legacy-tsa §12): which data row each line of a legacy score file holds, and
how the job batched a split -- file order in batches of ``batch_size``, or, for a torchrun job, each rank's
share of the ``DistributedSampler`` order batched separately and gathered rank-major."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .options import Options, VerifyError

MAX_WORLD_SEARCHED = 8  # hint search when tag_file.csv is not in the claimed order


def ddp_order(n: int, world: int, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The legacy multi-GPU order (§12) as torch implements it: each rank's share of
    ``DistributedSampler(shuffle=True, seed=0)`` after ``set_epoch(epoch)`` (a permutation of
    ``Generator().manual_seed(epoch)``, padded by repeating its head to a multiple of ``world``,
    rank r taking ``padded[r::world]``), and the rank-major gather cut to ``n``: line k of a legacy
    multi-GPU score file holds data row ``order[k]``."""
    from torch.utils.data import DistributedSampler

    shares = []
    for r in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=0, drop_last=False)
        sampler.set_epoch(epoch)
        shares.append(np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler)))
    gathered = np.concatenate(shares) if shares else np.zeros(0, np.int64)
    return gathered[:n], shares


@dataclass
class Batch:
    rank: int
    index: int  # batch number on its rank
    rows: np.ndarray  # data rows, in the batch's order
    slot: int  # position of the batch's first entry in the rank-major gather


@dataclass
class Plan:
    """How the legacy job batched a split, and which data row each line of its score file holds."""

    n_data: int
    batch_size: int
    world: int | None
    epoch: int | None
    batches: list[Batch]
    line_rows: np.ndarray  # (n_lines,) data row of each legacy score-file line
    n_slots: int

    def describe(self) -> str:
        if self.world is None:
            return f"file order, batches of {self.batch_size}"
        return (f"DistributedSampler order of world size {self.world}, epoch {self.epoch}: each rank's share "
                f"batched by {self.batch_size}, gathered rank-major, cut to {self.n_data}")

    def limited(self, n_lines: int) -> Plan:
        """The batches needed for the first ``n_lines`` legacy lines (whole batches: MoE capacity couples a batch)."""
        need = [b for b in self.batches if b.slot < n_lines]
        return Plan(self.n_data, self.batch_size, self.world, self.epoch, need, self.line_rows[:n_lines],
                    self.n_slots)


def make_plan(n: int, batch_size: int, world: int | None = None, epoch: int | None = None) -> Plan:
    if world is None:
        batches = [Batch(0, i, np.arange(s, min(s + batch_size, n)), s) for i, s in enumerate(range(0, n, batch_size))]
        return Plan(n, batch_size, None, None, batches, np.arange(n), n)
    order, shares = ddp_order(n, world, epoch or 0)
    batches, slot = [], 0
    for r, share in enumerate(shares):
        for i, s in enumerate(range(0, len(share), batch_size)):
            rows = share[s:s + batch_size]
            batches.append(Batch(r, i, rows, slot))
            slot += len(rows)
    return Plan(n, batch_size, world, epoch, batches, order, slot)


def _gathered_orders(n: int, worlds: Sequence[int], epochs: Sequence[int]) -> Iterator[tuple[int, int, np.ndarray]]:
    """(world, epoch, line -> row) for many candidates, fast: the epoch's permutation is drawn once
    (``randperm`` of ``Generator().manual_seed(epoch)``, as DistributedSampler draws it) and shared by
    every world size; padding repeats it cyclically, rank r takes ``padded[r::world]``. Used only to
    SEARCH; the plan that is scored is built by torch's DistributedSampler itself (:func:`ddp_order`), and
    tests check the two agree."""
    for e in epochs:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0 + e)).numpy()
        for w in worlds:
            total = -(-n // w) * w
            padded = np.resize(perm, total)
            yield w, e, padded.reshape(-1, w).T.reshape(-1)[:n]


def find_epochs(y: np.ndarray, tags: np.ndarray, world: int, epochs: range) -> list[int]:
    """The epochs whose DistributedSampler order puts the labels ``y`` in the order of ``tags``."""
    if len(tags) != len(y):
        return []
    return [e for _, e, order in _gathered_orders(len(y), [world], epochs) if np.array_equal(y[order], tags)]


def find_any_order(y: np.ndarray, tags: np.ndarray, epochs: range) -> tuple[int | None, int | None] | None:
    """A (world, epoch) that explains ``tags`` (``(None, None)``: file order), for hints."""
    if len(tags) != len(y):
        return None
    if np.array_equal(y, tags):
        return None, None
    for w, e, order in _gathered_orders(len(y), range(1, MAX_WORLD_SEARCHED + 1), epochs):
        if np.array_equal(y[order], tags):
            return w, e
    return None


def order_for_split(opts: Options, split: str, y: np.ndarray, tags: np.ndarray | None, tag_name: str,
                    max_epoch: int, notes: list[str]) -> tuple[int | None, int | None, str]:
    """(world, epoch, how the epoch was found) for one split."""
    if opts.world_size is None:
        return None, None, ""
    if opts.epoch is not None:
        return opts.world_size, opts.epoch, "--epoch"
    epochs = range(0, max_epoch + 2)
    if tags is None:
        notes.append(f"{split}: no {tag_name} to find the evaluation epoch and no --epoch: epoch 0 used (the "
                     "comparison with the legacy model does not depend on it)")
        return opts.world_size, 0, "default 0 (no tag file)"
    found = find_epochs(y, tags, opts.world_size, epochs)
    if len(found) == 1:
        return opts.world_size, found[0], f"{tag_name}"
    if not found:
        raise VerifyError(f"{tag_name}: its labels match the DistributedSampler order of world size "
                          f"{opts.world_size} at no epoch {epochs.start}..{epochs.stop - 1}; check --world-size (the "
                          "job's GPU count) and the data folder, or give --epoch")
    raise VerifyError(f"{tag_name}: its labels match the DistributedSampler order of world size {opts.world_size} at "
                      f"several epochs ({', '.join(map(str, found[:12]))}); give --epoch")
