"""The two encoders of the TSA model: the order (transaction-history) stack and the feature
(current-transaction) stack. Both read a shared embedding table passed in by the network, so
the table is registered once (the legacy model registered it in every stack)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionLayerPostNorm, AttentionLayerPreNorm
from .blocks import FeatureAggregation, FeedForward
from .moe import MixtureOfExperts


def numerical_rows(table: Tensor, n_num: int) -> Tensor:
    """Rows of the shared table used by the numerical features: feature j uses row
    ``n_embedding - n_num + 1 + j`` (the table has n_embedding + 2 rows). Returns (n_num, D)."""
    n_embedding = table.shape[0] - 2
    return table[n_embedding - n_num + 1: n_embedding + 1]


# Training-memory switch: recompute the embedding + FeatureAggregation chains of the order stack in
# backward (in slices of D, see FeatureAggregation.aggregate_codes_recomputed) instead of keeping
# their activations (the gathered (D, B·L, n_cat) embeddings, every layer's output and LeakyReLU).
# Those chains draw no random numbers: the forward value is the same and the gradients equal the
# stored path's up to fp32 summation order; only time is spent (a second forward of the chains).
# Module-level so tests and benchmarks can compare against the stored-activation path.
RECOMPUTE_AGGREGATION = True

# Lean last layer: the stacks return their last token only, so their last layer computes that token alone
# (keys and values of every token; every random draw of the full layer still made when legacy_rng).
# Module-level so tests and benchmarks can compare against the full computation.
LEAN_LAST_LAYER = True
# The exact path's training runs the legacy's operation order: the full last layer and the rows-first feature
# aggregation (see rows_first). False: the fast path's order there too (lean, feature first) -- the same function,
# other rounding; tests and the fast_path parity category compare the two paths in one order with it.
EXACT_TRAINING_IN_LEGACY_ORDER = True


def _exact_training(layers: nn.ModuleList) -> bool:
    last = layers[-1]
    return bool(last.training and getattr(last, "legacy_rng", True))


def rows_first(layers: nn.ModuleList) -> bool:
    """Whether the feature aggregation runs rows first (the legacy's operation order) instead of feature first:
    in the exact path's training only. The feature-first chain is the same function and faster, but its forward
    rounds differently, and the gradient of a degenerate aggregation's scalar last bias is a sum that cancels
    ~600-fold (it shifts one half of a LayerNorm's input): one ulp in the forward moves it by up to 5e-3
    relative, beyond the gradient tolerance (parity ``gradient dual:drawn``). Rows first, the exact path's
    training keeps the legacy's rounding there; eval and the fast path run feature first."""
    return EXACT_TRAINING_IN_LEGACY_ORDER and _exact_training(layers)


def lean_last_layer(layers: nn.ModuleList) -> bool:
    """Whether the last layer computes the summary token alone: in eval always (every path, export included);
    in training on the fast path (``legacy_rng=False``). The exact path trains the full last layer as the legacy
    does: the lean layer's gradients are the legacy's analytically but round differently, beyond the gradient
    tolerance on the cancelling sums of :func:`rows_first` (parity ``convergence dual``, ``gradient dual:drawn``)."""
    if not LEAN_LAST_LAYER:
        return False
    return not (EXACT_TRAINING_IN_LEGACY_ORDER and _exact_training(layers))


# Empty positions -- every code 0 and every number 0, the legacy's left padding -- all aggregate to the same
# vector: the chains run on the distinct positions only (the others and one empty position), and the result is
# gathered back to every position. Each position's value is computed by the same per-row arithmetic (tested
# bit-equal); the gather's backward sums the empty positions' gradients into the one computed (those are exact
# zeros in both networks: padded keys are masked), so only the weight-gradient sums lose terms that are zero.
# In eval and the fast path's training (see dedupe_empty_positions); eager mode on CPU only (tracing, scripting,
# compiling and export see the plain computation; on accelerators the two host synchronisations it needs are
# unmeasured, no GPU here, so they run the plain computation). Module-level so tests and benchmarks can compare
# against the plain computation.
DEDUPE_EMPTY_POSITIONS = True


def _empty_positions(codes: Tensor, x_num: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(rows, inverse)`` over the flattened (B·L) positions: ``rows`` the non-empty positions and the first
    empty one, ``inverse`` each position's row in that list; None when fewer than two positions are empty, or
    when not in eager mode on CPU."""
    if codes.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return None
    empty = ((codes == 0).all(-1) & (x_num == 0).all(-1)).reshape(-1)  # (B·L,)
    n_empty = int(empty.sum())
    if n_empty < 2:
        return None
    kept = torch.logical_not(empty).nonzero()[:, 0]
    first_empty = empty.nonzero()[:1, 0]
    inverse = torch.full_like(empty, kept.numel(), dtype=torch.long)
    inverse[kept] = torch.arange(kept.numel(), device=codes.device)
    return torch.cat([kept, first_empty]), inverse


def dedupe_empty_positions(layers: nn.ModuleList) -> bool:
    """Whether the empty positions are aggregated once (see DEDUPE_EMPTY_POSITIONS): in eval (the values are
    bit-equal) and in the fast path's training. Not in the exact path's training, forward included: it keeps the
    legacy's operation order (see :func:`rows_first`), and weight-gradient sums without their zero terms associate
    differently -- rounding that Adam amplifies past the step tolerance of parity ``convergence single`` within ~60
    steps; and the rows-first chains' matmuls over fewer rows are not bit-equal on every BLAS (MKL on this AMD
    EPYC's AVX-512 path rounds (R, k) @ (k, m) differently for other R: up to 1.5e-7 on the scores of
    tests/test_port_memory.py's wide configs), so not even the forward may skip them there."""
    return DEDUPE_EMPTY_POSITIONS and not (EXACT_TRAINING_IN_LEGACY_ORDER and _exact_training(layers))


def checkpointing_active(module: nn.Module) -> bool:
    """Whether activation recomputation may be used: training with autograd on, and not while
    tracing, scripting or compiling (export and ``torch.compile`` see the plain computation)."""
    return (module.training and torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


def run_layers(layers: nn.ModuleList, x: Tensor, *args, recompute: bool, last_only: bool = False) -> Tensor:
    """Apply ``layers`` in turn; with ``recompute`` each under ``torch.utils.checkpoint`` with the
    RNG state preserved, so the recomputation in backward replays the same dropout masks and MoE
    coin flips and leaves the global generator where the plain forward + backward leaves it.
    ``last_only``: the last layer computes the last token only (its output is (1, B, W))."""
    n = len(layers)
    for i, layer in enumerate(layers):
        kw = {"last_only": True} if last_only and i == n - 1 else {}
        if recompute:
            x = checkpoint(layer, x, *args, use_reentrant=False, preserve_rng_state=True, **kw)
        else:
            x = layer(x, *args, **kw)
    return x


def make_feedforward(width: int, hidden: int, dropout: float, use_moe: bool, num_experts: int,
                     eval_policy: str, batch_invariant: bool) -> nn.Module:
    if use_moe:
        return MixtureOfExperts(width, hidden, num_experts, eval_policy, batch_invariant)
    return FeedForward(width, hidden, dropout)


class OrderAttentionModule(nn.Module):
    """Encodes a transaction history (legacy ``OrderAttentionLayer``).

    Per position: categorical codes and numerical values are embedded in the shared table and each
    group is reduced over its features by a :class:`FeatureAggregation` -> (B, L, D) twice ->
    (B, L, E=2D). A learned dummy token is appended last; the post-norm attention layers (temporal
    when ``use_time``) run over the L+1 tokens; the dummy token's output (B, E) is returned.
    """

    def __init__(self, n_cat: int, n_num: int, dim: int, hidden: int, num_heads: int, dropout: float,
                 n_layers: int, use_moe: bool, num_experts: int, use_time: bool, emb_tbl_use_bias: bool,
                 eval_policy: str = "random", batch_invariant: bool = False,
                 activation_checkpointing: bool = False):
        super().__init__()
        width = 2 * dim
        self.n_cat, self.n_num, self.use_time = n_cat, n_num, use_time
        self.activation_checkpointing = bool(activation_checkpointing)
        # creation order = legacy order (seeded construction draws the same numbers)
        self.dummy_token = nn.Parameter(torch.rand(1, width))
        self.input_norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(
            AttentionLayerPostNorm(width, num_heads, dropout,
                                   lambda: make_feedforward(width, hidden, dropout, use_moe, num_experts,
                                                            eval_policy, batch_invariant), use_time)
            for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.token_norm = nn.LayerNorm(width)
        if emb_tbl_use_bias:
            torch.randn(n_cat + n_num, dim)  # legacy `emb_tbl_bias`: drawn, never used -> discarded
        self.aggregate_cat = FeatureAggregation(n_cat)
        self.aggregate_num = FeatureAggregation(n_num)

    def forward(self, table: Tensor, x_cat: Tensor, x_num: Tensor, time_seq: Tensor | None = None,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
                row_mask: Tensor | None = None, return_seq: bool = False) -> Tensor:
        """``table`` (n_emb+2, D) weight; ``x_cat`` (B, L, n_cat) float codes; ``x_num`` (B, L, n_num);
        ``time_seq`` (B, L, 1); ``key_padding_mask`` (B, L+1), True = ignore; ``row_mask`` (B,)
        bool: rows forming the MoE group (all rows when None)."""
        B, L, _ = x_cat.shape
        codes = x_cat.long()
        active = checkpointing_active(self)
        recompute = active and RECOMPUTE_AGGREGATION  # no random draws inside: recomputed in backward
        # the exact path's training aggregates every position, forward and backward (see dedupe_empty_positions)
        unique = _empty_positions(codes, x_num) if dedupe_empty_positions(self.layers) else None
        if unique is None:
            x = self._aggregate(table, codes, x_num, recompute)  # (B, L, E)
        else:  # the empty positions aggregated once (see DEDUPE_EMPTY_POSITIONS)
            rows_idx, inverse = unique
            x = self._aggregate(table, codes.reshape(B * L, codes.shape[-1])[rows_idx][None],
                                x_num.reshape(B * L, x_num.shape[-1])[rows_idx][None], recompute)[0]  # (R', E)
            x = x.index_select(0, inverse).view(B, L, -1)
        x = x.transpose(0, 1)  # (L, B, E)
        x = self.input_norm(x)
        x = torch.cat([x, self.dummy_token.expand(1, B, -1)], dim=0)  # (L+1, B, E), dummy last
        x = self.token_norm(x)
        time = None
        if self.use_time:
            time = F.pad(time_seq.reshape(B, L, 1), (0, 0, 0, 1)).transpose(0, 1)  # (L+1, B, 1)
        # only the dummy token is returned: the last layer computes it alone (see nn.attention)
        x = run_layers(self.layers, x, time, attn_mask, key_padding_mask, row_mask,
                       recompute=active and self.activation_checkpointing,
                       last_only=lean_last_layer(self.layers) and not return_seq)
        if return_seq:
            return x.transpose(0, 1)  # (B, L+1, E)
        return x[-1]  # (B, E)

    def _aggregate(self, table: Tensor, codes: Tensor, x_num: Tensor, recompute: bool,
                   forward_rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Both feature aggregations of positions ``codes`` (..., n_cat), ``x_num`` (..., n_num) -> (..., E),
        recomputed in backward or stored; ``forward_rows``: see ``FeatureAggregation.aggregate_codes_recomputed``."""
        rows = numerical_rows(table, self.n_num)
        ff = not rows_first(self.layers)
        if recompute:
            cat = self.aggregate_cat.aggregate_codes_recomputed(codes, table, padding_idx=0, feature_first=ff,
                                                                forward_rows=forward_rows)
            num = self.aggregate_num.project_embeddings_recomputed(rows, x_num, feature_first=ff,
                                                                   forward_rows=forward_rows)
        else:
            cat = self.aggregate_cat.aggregate_codes(codes, table, padding_idx=0, feature_first=ff)  # (..., D)
            num = self.aggregate_num.project_embeddings(rows, x_num, feature_first=ff)  # (..., D)
        return torch.cat([cat, num], dim=-1)


class FeatureAttentionModule(nn.Module):
    """Encodes the current transaction (legacy ``FeatureAttentionLayer``).

    The last position's categorical and numerical features become one token each (plus the
    per-feature bias), engineered feature j becomes row j+1 of the engineered table times its value
    (plus its bias), and row 0 of that table is appended as the summary token. Pre-norm attention
    layers run over these tokens without masks; the summary token's output (B, D) is returned.
    """

    def __init__(self, n_cat: int, n_num: int, n_eng: int, dim: int, hidden: int, num_heads: int,
                 dropout: float, n_layers: int, use_moe: bool, num_experts: int, emb_tbl_use_bias: bool,
                 eval_policy: str = "random", batch_invariant: bool = False,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.n_cat, self.n_num, self.n_eng = n_cat, n_num, n_eng
        self.activation_checkpointing = bool(activation_checkpointing)
        self.layers = nn.ModuleList(
            AttentionLayerPreNorm(dim, num_heads, dropout,
                                  lambda: make_feedforward(dim, hidden, dropout, use_moe, num_experts,
                                                           eval_policy, batch_invariant))
            for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        # legacy `emb_tbl_bias` (used here, unlike in the order stack)
        self.feature_bias = nn.Parameter(torch.randn(n_cat + n_num, dim)) if emb_tbl_use_bias else None
        self.token_norm = nn.LayerNorm(dim)
        self.engineered_bias = (nn.Parameter(torch.randn(n_eng, dim))
                                if n_eng > 0 and emb_tbl_use_bias else None)

    def forward(self, table: Tensor, table_engineered: Tensor, x_cat: Tensor, x_num: Tensor,
                x_engineered: Tensor | None = None) -> Tensor:
        """``x_cat`` (B, L, n_cat), ``x_num`` (B, L, n_num): only position L is read;
        ``x_engineered`` (B, n_eng). Returns (B, D)."""
        B = x_cat.shape[0]
        cat = F.embedding(x_cat[:, -1].long(), table, padding_idx=0)  # (B, n_cat, D)
        num = numerical_rows(table, self.n_num) * x_num[:, -1, :, None]  # (B, n_num, D)
        tokens = torch.cat([cat, num], dim=1)  # (B, n_cat + n_num, D)
        if self.feature_bias is not None:
            tokens = tokens + self.feature_bias
        parts = [tokens]
        if self.n_eng > 0:
            eng = table_engineered[1: self.n_eng + 1] * x_engineered[:, :, None]  # (B, n_eng, D)
            if self.engineered_bias is not None:
                eng = eng + self.engineered_bias
            parts.append(eng)
        summary = F.embedding(torch.zeros(B, 1, dtype=torch.long, device=x_cat.device),
                              table_engineered, padding_idx=0)  # (B, 1, D), row 0 (never trained)
        parts.append(summary)
        x = torch.cat(parts, dim=1).transpose(0, 1)  # (T, B, D), T = n_cat + n_num + n_eng + 1
        x = self.token_norm(x)
        x = run_layers(self.layers, x, recompute=self.activation_checkpointing and checkpointing_active(self),
                       last_only=lean_last_layer(self.layers))  # only the summary token is returned (see lean_last_layer)
        return x[-1]  # (B, D)
