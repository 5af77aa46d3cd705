"""Building a (legacy, port) pair that holds the same weights, and running both sides.

The port's weights always come from the legacy model through ``lightning_port.weight_map``
(the table the converter uses), so every forward/gradient check also exercises the map.
``perturb`` moves every legacy parameter off its initial value (zero-initialised biases, the
padding rows) so that a swapped or misplaced tensor cannot hide behind a zero.
``mutate`` is a hook applied to the port after its weights are loaded (the mutation tests plant
bugs through it; ``None`` in the real suite).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from reference.training import model_inputs

from .cases import ParityCase
from .rng import seeded
from .strategies import InputBatch, ModelConfig

Mutation = Callable[[Any], None]


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add seeded noise to every parameter: ``scale·std`` of the tensor, or 0.05 absolute when it is constant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.numel() == 0:
                continue
            std = float(p.std()) if p.numel() > 1 else 0.0
            size = scale * std if std > 0 else 0.05
            p.add_(torch.randn(p.shape, generator=gen) * size)


def dropped_keys(port, kind: str) -> list[str]:
    from lightning_port.weight_map import dropped_legacy_keys

    return dropped_legacy_keys(port.config, kind)


@dataclass
class Pair:
    case: ParityCase
    config: ModelConfig
    legacy: torch.nn.Module
    port: Any
    init_seed: int

    @property
    def kind(self) -> str:
        return self.case.kind

    def context(self, **extra) -> dict:
        return {"model": self.case.model, "config": self.config.kwargs, "init_seed": self.init_seed, **extra}


def make_pair(case: ParityCase, config: ModelConfig, init_seed: int, perturb: bool = True,
              mutate: Mutation | None = None, **port_options) -> Pair:
    from lightning_port.weight_map import legacy_to_port

    legacy = case.build_reference(config, seed=init_seed)
    if perturb:
        perturb_(legacy, init_seed + 1)
    port = case.build_port(config, **port_options)
    port.network.load_state_dict(legacy_to_port(legacy.state_dict(), port.config, case.kind), strict=True)
    if mutate is not None:
        mutate(port)
    return Pair(case, config, legacy, port, init_seed)


def forward_inputs(batch: InputBatch, kind: str) -> tuple[tuple, dict]:
    return model_inputs(batch.batch, kind)


def run_eval(model, batch: InputBatch, kind: str, seed: int) -> dict[str, torch.Tensor]:
    args, kwargs = forward_inputs(batch, kind)
    model.eval()
    with torch.no_grad(), seeded(seed):
        scores, ensemble = model(*args, **kwargs)
    return {"scores": scores, "ensemble": ensemble}


def run_train(model, batch: InputBatch, kind: str, seed: int, params: dict[str, torch.Tensor]):
    """Train-mode forward + CrossEntropy(sum) backward under ``seed``; returns outputs and grads by name."""
    args, kwargs = forward_inputs(batch, kind)
    model.train()
    for p in params.values():
        p.grad = None
    with seeded(seed):
        scores, ensemble = model(*args, **kwargs)
        loss = F.cross_entropy(scores, batch.batch["y"], reduction="sum")
        loss.backward()
    grads = {n: p.grad for n, p in params.items()}
    return {"scores": scores.detach(), "loss": loss.detach()}, grads


def port_grads_as_legacy(pair: Pair, grads: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Port gradients keyed by legacy names (through the weight map); no gradient -> zeros."""
    from lightning_port.weight_map import port_to_legacy

    params = dict(pair.port.network.named_parameters())
    filled = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in grads.items()}
    return port_to_legacy(filled, pair.port.config, pair.kind)
