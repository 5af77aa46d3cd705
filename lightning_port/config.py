"""Typed, validated configuration of the TSA networks.

Field names are the legacy hyperparameter names (``train.py`` / the legacy constructors), so a
legacy ``hparams.json`` maps onto :class:`TSAConfig` without renaming. The other options are new:

- ``moe_eval_policy``: how a mixture-of-experts layer picks the second expert in eval mode.
  ``"random"`` is the legacy behaviour (a coin flip per token, so eval outputs depend on the RNG).
  The deterministic ones are ``"threshold"`` (keep the second expert when its normalised gate is
  above 0.2, the legacy threshold), ``"expected"`` (always dispatch it, weighted by its gate times
  the legacy keep-probability ``min(1, g2 / 0.2)``: the legacy layer's output averaged over its
  coin flip), ``"all"`` (always keep) and ``"none"`` (top-1 only).
- ``batch_invariant``: eval-mode MoE without an expert-capacity limit, so a row's score does not
  depend on the other rows of its batch. Needs a deterministic ``moe_eval_policy``.

These two only change eval mode; training is always the legacy function.

- ``activation_checkpointing``: run every attention layer (order, feature and gate stacks) under
  ``torch.utils.checkpoint`` in training, recomputing its activations in backward with the RNG
  state replayed (same dropout masks and coin flips). Same values, gradients and RNG consumption;
  less training memory for more time. No effect in eval, under tracing/export or compilation.
- ``fused_eval_attention``: in eval (no dropout draws, no explicit ``attn_mask``, |time| < 8e7) run
  attention on ``F.scaled_dot_product_attention`` with the separable time factor. Faster inference;
  the same function, but its fp32 rounding differs more from the legacy's (about 2x the explicit
  path's error at the full default size), so it is off by default to keep parity within atol 1e-5.

- ``legacy_rng``: ``True`` (default) draws every training-mode random number as the legacy model does
  (dropout masks with ``bernoulli_``, MoE coins, same order, shapes and memory layouts), so the same seed
  gives the same masks. ``False`` is the opt-in fast path: the same function, parameters and checkpoints,
  with training-mode draws from the cheapest source (see :mod:`lightning_port.nn.draws`). Eval is the same
  in both (the legacy coin stream is kept there).

Impossible combinations raise :class:`ValueError` with one sentence at construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MOE_EVAL_POLICIES = ("random", "threshold", "expected", "all", "none")
DETERMINISTIC_POLICIES = tuple(p for p in MOE_EVAL_POLICIES if p != "random")


@dataclass(frozen=True)
class TSAConfig:
    """Hyperparameters of the single- and dual-sequence TSA networks (legacy names)."""

    n_cat_features: int
    n_num_features: int
    n_classes: int
    n_embedding: int
    seq_len: int = 51
    n_engineered_num_features: int = 0
    dim_embedding_table: int = 128
    dim_attn_feedforward: int = 64
    use_mlp: int = 0
    num_heads: int = 1
    dropout: float = 0.1
    n_layers_order: int = 1
    n_layers_feature: int = 1
    emb_tbl_use_bias: int = 1
    use_moe: bool = True
    num_experts: int = 5
    use_time_seq: bool = True
    moe_eval_policy: str = "random"
    batch_invariant: bool = False
    activation_checkpointing: bool = False
    fused_eval_attention: bool = False
    legacy_rng: bool = True

    def __post_init__(self) -> None:
        for name in ("activation_checkpointing", "fused_eval_attention", "legacy_rng"):
            value = getattr(self, name)
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError(f"{name} must be a bool, got {value!r}.")
        # Normalise the legacy 0/1 integer flags to bools (the legacy scripts pass both).
        for name in ("use_moe", "use_time_seq", "batch_invariant", "activation_checkpointing",
                     "fused_eval_attention", "legacy_rng"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        object.__setattr__(self, "emb_tbl_use_bias", int(bool(self.emb_tbl_use_bias)))
        self._validate()

    # Derived widths -----------------------------------------------------------------------
    @property
    def dim_order(self) -> int:
        """E = 2·D, the width of the order (sequence) stack."""
        return 2 * self.dim_embedding_table

    @property
    def n_cat_codes(self) -> int:
        """Categorical codes live in 1..n_cat_codes (0 is padding)."""
        return self.n_embedding - self.n_num_features

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TSAConfig:
        """Build from a dict, ignoring keys that are not config fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def _validate(self) -> None:
        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")

        for name in ("n_cat_features", "n_num_features", "n_embedding", "seq_len",
                     "dim_embedding_table", "dim_attn_feedforward", "num_heads", "num_experts"):
            positive(name)
        positive("n_classes", 2)
        for name in ("n_engineered_num_features", "n_layers_order", "n_layers_feature"):
            positive(name, 0)
        if self.use_mlp:
            raise ValueError("use_mlp=1 is not supported: the legacy model raises NameError for it "
                             "(MLPBlock is undefined), so there is no behaviour to port.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.dim_order % self.num_heads:
            raise ValueError(f"The order stack width 2*dim_embedding_table={self.dim_order} is not "
                             f"divisible by num_heads={self.num_heads}.")
        if self.dim_embedding_table % self.num_heads:
            raise ValueError(f"The feature stack width dim_embedding_table={self.dim_embedding_table} "
                             f"is not divisible by num_heads={self.num_heads}.")
        if self.n_num_features > self.n_embedding:
            raise ValueError(f"n_num_features={self.n_num_features} exceeds n_embedding={self.n_embedding}: "
                             f"numerical rows n_embedding-n_num_features+1.. would fall outside the table.")
        if self.n_num_features == self.n_embedding:
            raise ValueError("n_num_features equals n_embedding, which leaves no table rows for "
                             "categorical codes (codes use rows 1..n_embedding-n_num_features).")
        if self.moe_eval_policy not in MOE_EVAL_POLICIES:
            raise ValueError(f"moe_eval_policy must be one of {MOE_EVAL_POLICIES}, got {self.moe_eval_policy!r}.")
        if self.batch_invariant and self.use_moe and self.moe_eval_policy == "random":
            raise ValueError("batch_invariant=True needs a deterministic moe_eval_policy "
                             f"(one of {DETERMINISTIC_POLICIES}); 'random' draws coins shaped by the batch.")
