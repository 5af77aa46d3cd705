"""RNG alignment: seed-and-restore around each side, and the reseed-per-step protocol.

"Same seed" means: each side runs right after ``torch.manual_seed(seed)`` and consumes the
global generator in its own execution order (legacy-tsa.md section 10). :func:`seeded` does that
and restores the caller's RNG state afterwards, so a check never leaks state into the next one
and a failing example reproduces from its seed alone.

The recorded trajectories reseed before every optimiser step with ``torch.manual_seed(100 + step)``
(``STEP_SEED_BASE``); :func:`reseed_for_step` is the legacy-loop side, :class:`ReseedPerStep` the
Lightning side.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

STEP_SEED_BASE = 100  # the recorded trajectories: torch.manual_seed(100 + step) before each step


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block right after ``torch.manual_seed(seed)``; restore torch's (CPU) RNG state after."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch, numpy and Python RNG states after the block (no reseeding)."""
    t, n, p = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(t)
        np.random.set_state(n)
        random.setstate(p)


def reseed_for_step(step: int, base: int = STEP_SEED_BASE) -> None:
    """The protocol's reseed: ``torch.manual_seed(base + step)`` right before step ``step``'s forward."""
    torch.manual_seed(base + step)


class ReseedPerStep(Callback):
    """Lightning side of the protocol: reseed in ``on_train_batch_start`` with the global step.

    Also records the learning rate each step ran with (``lrs``) and the training losses
    (``losses``), the per-step quantities the training check compares.
    """

    def __init__(self, base: int = STEP_SEED_BASE) -> None:
        self.base = base
        self.lrs: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        reseed_for_step(trainer.global_step, self.base)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
