"""Tolerance policy as data.

Defaults per dtype are ``torch.testing.assert_close``'s table. A check may override them, but only
with a reason string; the report prints the tolerance every check used and the reason for any
override. ``rtol`` and ``atol`` are always given together. An element passes when
``|actual - expected| <= atol + rtol * |expected|`` (``torch.isclose``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    reason: str = "torch.testing default for the dtype"

    def as_dict(self) -> dict:
        return {"rtol": self.rtol, "atol": self.atol, "reason": self.reason}


EXACT = Tolerance(0.0, 0.0, "bit-exact: the same operations on the same numbers")

DTYPE_DEFAULTS: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1.3e-6, 1e-5),
    torch.float64: Tolerance(1e-7, 1e-7),
    torch.float16: Tolerance(1e-3, 1e-5),
    torch.bfloat16: Tolerance(1.6e-2, 1e-5),
}

# Per-check overrides. Every entry carries the reason it differs from the dtype default.
OVERRIDES: dict[str, Tolerance] = {
    # Seeded construction draws the same numbers in the same order into the same shapes.
    "init.weights": EXACT,
    "structure.roundtrip": EXACT,
    # Byte formats: compared as bytes, the tolerance only documents that.
    "metrics.score_files": EXACT,
    "metrics.percentile_table": EXACT,
    # Gradients are sums over the batch and over tokens computed in a different association order
    # (index dispatch instead of one-hot einsums, fused embedding aggregation). Relative rounding
    # of a sum of n fp32 terms grows like n * eps ~ 1e-4 for the largest sums here; issue 2's
    # recording tolerance for gradients is the same (rtol 1e-3, atol 1e-5).
    "gradient.grads": Tolerance(1e-3, 1e-5, "gradient sums in a different association order (legacy "
                                "recording tolerance for gradients, issue 2)"),
    # Training: lrs follow the same closed-form schedule.
    "training.lrs": Tolerance(1e-12, 0.0, "OneCycleLR is closed form: the same float arithmetic"),
    # Issue 7: onnxruntime vs eager; ORT fuses and reorders kernels (MatMul+Add, LayerNorm).
    "onnx.scores": Tolerance(1e-3, 1e-4, "onnxruntime's fused kernels reorder fp32 sums (issue 7 tolerance)"),
    # Issue 13: the int8 export's probabilities vs the fp32 eager port, models without MoE (int8 is not
    # offered for MoE: routing flips, see parity/checks/onnxrt.py). The int8 model's accuracy target
    # (issue 13: scores within 2e-2); measured without MoE: tiny-plain 1.3e-3 (5000 probe rows), 1.1e-3 on
    # this check's drawn batches; the production and default shapes 4.8e-3 / 4.4e-3 (docs/onnx.md), so a 4x
    # margin at least, and a mis-scaled or saturating int8 kernel moves probabilities by far more
    # (tests/test_export.py).
    "onnx.int8_probs": Tolerance(0.0, 2e-2, "int8 quantization error: the int8 accuracy target of issue 13 "
                                 "(|Δprob| <= 2e-2); measured without MoE 1.1e-3..4.8e-3 (docs/onnx.md)"),
}

# Final weights after N Adam steps: an element that fails the output tolerance is allowed only when its
# gradient was at rounding level in some step on the legacy side (see ``GradientNoiseRecorder``) and it stays
# within Adam's step bound sum(lr).
NOISE_REL = 1e-5
STEP_GRAD_RTOL = 1e-3  # the gradient category's rtol: per-step gradients agreeing to it cannot drift apart
ADAM_REASON = (
    "Adam divides by sqrt(v): an element whose gradient is at rounding level in some step (the attention key "
    "bias and the gate columns of unselected experts, whose gradients are analytically zero; a ReLU unit at its "
    "boundary) moves by up to lr either way, so ulp-level gradient differences become lr-sized weight "
    f"differences. Only elements whose gradient was nonzero but <= {NOISE_REL:g} x the tensor's max |grad| in "
    f"some step (on either side), or whose legacy and port gradients of some step differ by more than "
    f"{STEP_GRAD_RTOL:g} relative (rounding-dominated, e.g. a cancelling sum), may differ, and by at most sum(lr) "
    "(the Adam step bound); every other element is held to the output tolerance."
)


class GradientNoiseRecorder:
    """Marks, per parameter element, whether its gradient was ever at rounding level during a run.

    Hooked into the optimizer (step pre-hook), so it sees each step's gradients before Adam uses them.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.masks: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []  # each step's gradients, by parameter name
        if optimizer is not None:
            optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer, args=(), kwargs=None) -> None:
        self.steps.append({})
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or p.grad.numel() == 0 or id(p) not in self.names:
                    continue
                name = self.names[id(p)]
                self.steps[-1][name] = p.grad.detach().clone()
                g = p.grad.detach().abs()
                noisy = (g > 0) & (g <= NOISE_REL * g.max())
                self.masks[name] = self.masks[name] | noisy if name in self.masks else noisy

    def _by_key(self, by_name: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``by_name`` under every state_dict key (shared tables appear under several keys)."""
        by_ptr = {p.data_ptr(): n for n, p in self.model.named_parameters()}
        out = {}
        for key, value in self.model.state_dict().items():
            name = by_ptr.get(value.data_ptr())
            if name in by_name:
                out[key] = by_name[name]
        return out

    def state_masks(self) -> dict[str, torch.Tensor]:
        return self._by_key(self.masks)

    def step_grads(self) -> list[dict[str, torch.Tensor]]:
        return [self._by_key(step) for step in self.steps]


def tolerance_for(check: str, dtype: torch.dtype = torch.float32) -> Tolerance:
    """The override for ``check`` (e.g. ``"gradient.grads"``) if any, else the dtype default."""
    if check in OVERRIDES:
        return OVERRIDES[check]
    try:
        return DTYPE_DEFAULTS[dtype]
    except KeyError:
        raise KeyError(f"no default tolerance for dtype {dtype}") from None
