"""Small building blocks: feature aggregation, the position-wise feed-forward, classifier heads."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .draws import RandomDraws, dropout, dropout_last

LEAKY_SLOPE = 0.01
# Training memory: the recomputed aggregation chains are re-run in backward in slices of the
# embedding dimension D (every (d, row) is aggregated independently), each slice's working set
# about this many bytes of first-layer input.
RECOMPUTE_CHUNK_BYTES = 64 << 20


class _SlicedRecompute(torch.autograd.Function):
    """Output ``fn(*inputs)`` computed once without storing any intermediate; in backward the
    function is re-run slice by slice along D (``fn(*inputs, d_slice=(a, b))`` gives the output's
    slice ``a:b`` along ``dim``) and each slice's gradients are accumulated into the inputs'.

    The forward value is exactly ``fn(*inputs)``. The gradients are those of the stored path up to
    fp32 summation order (weight gradients are summed slice by slice). No random numbers are drawn.
    """

    @staticmethod
    def forward(ctx, fn, dim: int, n_slices: int, *inputs):
        # ``fn`` may be a pair (fn, forward_fn): forward_fn(*inputs) computes the same output bit for bit another
        # way (fewer rows, see FeatureAggregation.aggregate_codes_recomputed); the backward recomputes with fn
        fn, forward_fn = fn if isinstance(fn, tuple) else (fn, None)
        ctx.fn, ctx.dim, ctx.n_slices = fn, dim, n_slices
        # the recomputation runs under the forward's autocast state (as torch.utils.checkpoint)
        device = inputs[-1].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                        torch.is_autocast_cache_enabled())
        ctx.save_for_backward(*inputs)
        return (forward_fn or fn)(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        leaves = [x.detach().requires_grad_(True) if need else x.detach()
                  for x, need in zip(inputs, needs)]
        wanted = [x for x, need in zip(leaves, needs) if need]
        size = grad.shape[ctx.dim]
        step = -(-size // ctx.n_slices)
        device, enabled, dtype, cache = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache):
            for a in range(0, size, step):
                b = min(a + step, size)
                out = ctx.fn(*leaves, d_slice=(a, b))
                torch.autograd.backward(out, grad.narrow(ctx.dim, a, b - a), inputs=wanted)
        return (None, None, None, *[x.grad if need else None for x, need in zip(leaves, needs)])


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The lower-precision dtype the first Linear of a chain casts its gathered input to (``torch.autocast`` on
    ``t``'s device with a float table), else ``None``. Not under tracing, compile or export (they see the plain
    gather, which autocast casts the same way)."""
    dev = t.device.type
    if (not t.is_floating_point() or t.dtype != torch.float32 or not torch.is_autocast_enabled(dev)
            or torch.jit.is_tracing() or torch.compiler.is_compiling()):
        return None
    return torch.get_autocast_dtype(dev)


class _LowpGather(torch.autograd.Function):
    """Rows of ``table`` in autocast's dtype: cast the (small) table, then gather -- the same values as gathering
    in fp32 and letting the first Linear's autocast cast the (large) gathered tensor, without writing the fp32
    copy and casting it (the fast path's largest copies under bf16). The table's gradient is accumulated in the
    table's dtype from the gradient cast back, as autocast's cast would: bit-equal to the plain gather.
    ``mode`` ``"embedding"``: ``F.embedding(idx, table, padding_idx)``; ``"columns"``: ``table.t()[:, idx]``."""

    @staticmethod
    def forward(ctx, idx, table, pad, dtype, mode):
        ctx.save_for_backward(idx)
        ctx.n_rows, ctx.pad, ctx.table_dtype, ctx.mode = table.shape[0], pad, table.dtype, mode
        low = table.to(dtype)
        if mode == "embedding":
            return F.embedding(idx, low, padding_idx=pad)
        return low.t().contiguous().index_select(1, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        g = grad.to(ctx.table_dtype)
        if ctx.mode == "embedding":
            pad = -1 if ctx.pad is None else ctx.pad
            gt = torch.ops.aten.embedding_dense_backward(g, idx, ctx.n_rows, pad, False)
        else:  # index_select's backward: index_add into zeros, then the transpose
            gt = torch.zeros(g.shape[0], ctx.n_rows, dtype=g.dtype, device=g.device).index_add_(1, idx, g).t()
        return None, gt, None, None, None


def _embed(codes: Tensor, table: Tensor, pad: int | None) -> Tensor:
    dtype = _autocast_dtype(table)
    if dtype is None:
        return F.embedding(codes, table, padding_idx=pad)
    return _LowpGather.apply(codes, table, pad, dtype, "embedding")


def _gather_columns(table: Tensor, idx: Tensor) -> Tensor:
    """``table.t().contiguous().index_select(1, idx)``: (d, len(idx))."""
    dtype = _autocast_dtype(table)
    if dtype is None:
        return table.t().contiguous().index_select(1, idx)
    return _LowpGather.apply(idx, table, None, dtype, "columns")


def _leaky(h: Tensor) -> Tensor:
    # in place when nothing is recorded (same values; one buffer fewer at the peak)
    inplace = not torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
    return F.leaky_relu(h, LEAKY_SLOPE, inplace=inplace)


class FeatureAggregation(nn.Module):
    """Six Linear layers n -> n//2 -> n//4 -> n//8 -> n//16 -> n//32 -> 1 with LeakyReLU(0.01)
    between them, applied along the feature axis (legacy ``FeatureAggregation``).

    For n < 32 some widths are 0 and the output is the last bias alone (earlier layers get zero
    gradients) -- legacy behaviour, kept. :meth:`aggregate_codes` and :meth:`project_embeddings`
    fuse the first Linear with the embedding lookup.
    """

    def __init__(self, n_features: int):
        super().__init__()
        widths = [n_features, n_features // 2, n_features // 4, n_features // 8, n_features // 16,
                  n_features // 32, 1]
        with warnings.catch_warnings():  # zero-width layers for n < 32 are legacy behaviour
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., n) -> (..., 1)."""
        return self._finish(self.layers[0](x), self._params())

    def _params(self) -> list[Tensor]:
        return [t for layer in self.layers for t in (layer.weight, layer.bias)]

    @staticmethod
    def _finish(h: Tensor, params) -> Tensor:
        for i in range(2, len(params), 2):
            h = F.linear(_leaky(h), params[i], params[i + 1])
        return h

    @staticmethod
    def _finish_feature_first(h: Tensor, params) -> Tensor:
        """The layers after the first on feature-first activations ``h`` (k, N): ``W @ leaky(h) + b``."""
        for i in range(2, len(params), 2):
            h = torch.addmm(params[i + 1][:, None], params[i], _leaky(h))
        return h

    def aggregate_codes_recomputed(self, codes: Tensor, table: Tensor, padding_idx: int | None = 0,
                                   feature_first: bool = True, forward_rows: tuple[Tensor, Tensor] | None = None
                                   ) -> Tensor:
        """:meth:`aggregate_codes` with nothing stored for backward but its inputs (training
        memory); the chain is recomputed in backward in slices of D. Same forward value.

        ``forward_rows`` (rows first only): ``(rows, inverse)`` over the flattened positions -- the forward runs
        the chain on positions ``rows`` and gathers position ``p``'s value from ``inverse[p]`` (bit-equal when the
        positions left out repeat one that is kept); the backward recomputes every position, so the gradients are
        the plain computation's bit for bit."""
        if not feature_first:
            *lead, n = codes.shape
            D = table.shape[1]
            n_slices = max(1, -(-(D * codes.numel() * table.element_size()) // RECOMPUTE_CHUNK_BYTES))
            pad = _pad_row(padding_idx, table)
            fn = lambda idx, tbl, *params, d_slice=None: _codes_chain_rows(idx, tbl, params, pad, d_slice)  # noqa: E731
            if forward_rows is not None:
                kept, inverse = forward_rows
                idx_kept = codes.reshape(-1, n)[kept].reshape(-1)
                fn = (fn, lambda idx, tbl, *params: _codes_chain_rows(idx_kept, tbl, params, pad).index_select(1, inverse))
            out = _SlicedRecompute.apply(fn, 0, min(n_slices, D), codes.reshape(-1), table, *self._params())
            return out.t().reshape(*lead, D)
        n_slices = max(1, -(-(table.shape[1] * codes.numel() * table.element_size()) // RECOMPUTE_CHUNK_BYTES))
        pad = _pad_row(padding_idx, table)
        fn = lambda idx, tbl, *params, d_slice=None: _codes_chain(idx, tbl, params, pad, d_slice)  # noqa: E731
        return _SlicedRecompute.apply(fn, -1, min(n_slices, table.shape[1]), codes, table, *self._params())

    def project_embeddings_recomputed(self, rows: Tensor, values: Tensor, feature_first: bool = True,
                                      forward_rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Numerical :meth:`project_embeddings` with nothing stored for backward but its inputs;
        recomputed in backward in slices of D. Same forward value. ``forward_rows``: as in
        :meth:`aggregate_codes_recomputed` (rows first only)."""
        n, D = rows.shape
        n_slices = max(1, -(-(values.numel() // n * D * self.layers[0].out_features * values.element_size())
                            // RECOMPUTE_CHUNK_BYTES))
        chain = _numerical_chain if feature_first else _numerical_chain_rows
        fn = lambda r, v, *params, d_slice=None: chain(r, v, params, d_slice)  # noqa: E731
        if forward_rows is not None and not feature_first:
            kept, inverse = forward_rows
            v_kept = values.reshape(-1, n)[kept]
            fn = (fn, lambda r, v, *params: chain(r, v_kept, params).index_select(0, inverse).view(*v.shape[:-1], D))
        return _SlicedRecompute.apply(fn, -1, min(n_slices, D), rows, values, *self._params())

    def aggregate_codes(self, codes: Tensor, table: Tensor, padding_idx: int | None = 0,
                        feature_first: bool = True) -> Tensor:
        """Categorical features: ``codes`` (B, L, n) int codes into ``table`` (N, D) -> (B, L, D).

        ``feature_first=False``: the legacy's order, rows first -- each Linear on ``(D·B·L, k)`` rows as the
        legacy's ``nn.Linear`` on ``(B, L, D, k)`` (the exact path's training: see :func:`rows_first`).

        Feature-first: the rows are gathered as ``(n, B·L·D)`` (a plain row lookup of the codes in
        feature-major order), so every Linear of the chain is one matmul with its weight on the left,
        ``W (k', k) @ h (k, B·L·D)`` -- no permuted copy of the ``(B, L, n, D)`` embeddings and no
        transposed gather. Row ``padding_idx`` is read but gets no gradient (``F.embedding`` semantics).
        """
        pad = _pad_row(padding_idx, table)
        if not feature_first:
            *lead, _ = codes.shape
            out = _codes_chain_rows(codes.reshape(-1), table, self._params(), pad)  # (D, B·L)
            return out.t().reshape(*lead, table.shape[1])
        return _codes_chain(codes, table, self._params(), pad)

    def project_embeddings(self, rows: Tensor, values: Tensor, feature_first: bool = True) -> Tensor:
        """Numerical features without materialising the permuted (B, L, D, n) copy: the first Linear is
        fused with the rows, ``M[g, j, d] = W[g, j] · row_j[d]``, so its output is one batched matmul
        ``values (B·L, n) @ M[g] (n, D)`` per output unit g, feature-first (g, B·L·D) like
        :meth:`aggregate_codes`. ``rows`` (n, D) the numerical rows of the table, ``values`` (B, L, n)
        -> (B, L, D)."""
        return (_numerical_chain if feature_first else _numerical_chain_rows)(rows, values, self._params())


def _pad_row(padding_idx: int | None, table: Tensor) -> int | None:
    """``padding_idx`` as a non-negative Python int (``F.embedding`` compares it with 0; the table's row
    count is only read for a negative index, so tracing sees no tensor-valued comparison)."""
    if padding_idx is None or padding_idx >= 0:
        return padding_idx
    return padding_idx + int(table.shape[0])


def _codes_chain(codes: Tensor, table: Tensor, params, pad: int | None, d_slice=None) -> Tensor:
    """Categorical chain of :meth:`FeatureAggregation.aggregate_codes` with explicit parameters:
    ``codes`` (B, L, n) -> (B, L, D), or its slice ``a:b`` along D for ``d_slice``."""
    w0, b0 = params[0], params[1]
    *lead, n = codes.shape
    if d_slice is not None:
        table = table[:, d_slice[0]: d_slice[1]]
    x = _embed(codes.permute(2, 0, 1), table, pad)  # (n, B, L, d) feature-first
    h = torch.addmm(b0[:, None], w0, x.reshape(n, x.numel() // n))  # (n//2, B·L·d)
    del x
    return FeatureAggregation._finish_feature_first(h, params).view(*lead, table.shape[1])


def _numerical_chain(rows: Tensor, values: Tensor, params, d_slice=None) -> Tensor:
    """Numerical chain of :meth:`FeatureAggregation.project_embeddings` with explicit parameters;
    ``rows`` (n, D), ``values`` (B, L, n) -> (B, L, D), or its slice ``a:b`` along D."""
    w0, b0 = params[0], params[1]
    if d_slice is not None:
        rows = rows[:, d_slice[0]: d_slice[1]]
    n, D = rows.shape
    k = w0.shape[0]
    fused = w0[:, :, None] * rows[None]  # (k, n, d): W[g, j] · row_j[d]
    R = values.numel() // n  # B·L (explicit: k may be 0 for n < 2, legacy degenerate widths)
    v = values.reshape(1, R, n)
    h = torch.baddbmm(b0[:, None, None], v.expand(k, R, n), fused)  # (k, B·L, d)
    return FeatureAggregation._finish_feature_first(h.view(k, R * D), params).view(*values.shape[:-1], D)


def _codes_chain_rows(idx: Tensor, table: Tensor, params, pad: int | None, d_slice=None) -> Tensor:
    """Rows-first categorical chain (the legacy's order: every Linear on ``(rows, k)`` as ``nn.Linear``) on flat
    codes ``idx`` (B·L·n,); returns (D, B·L), or rows ``a:b`` of it for ``d_slice``."""
    w0, b0 = params[0], params[1]
    n = w0.shape[1]
    if pad is not None and table.requires_grad and torch.is_grad_enabled():
        table = torch.cat([table[:pad], table[pad: pad + 1].detach(), table[pad + 1:]])
    if d_slice is not None:
        table = table[:, d_slice[0]: d_slice[1]]
    gathered = _gather_columns(table, idx)  # (d, B·L·n)
    d = gathered.shape[0]
    h = torch.addmm(b0, gathered.view(-1, n), w0.t())  # (d·B·L, n//2)
    del gathered
    return FeatureAggregation._finish(h, params).view(d, -1)  # (d, B·L)


def _numerical_chain_rows(rows: Tensor, values: Tensor, params, d_slice=None) -> Tensor:
    """Rows-first numerical chain; ``rows`` (n, D), ``values`` (B, L, n) -> (B, L, D), or its slice ``a:b``
    along D."""
    w0, b0 = params[0], params[1]
    if d_slice is not None:
        rows = rows[:, d_slice[0]: d_slice[1]]
    n, D = rows.shape
    fused = (rows[:, :, None] * w0.t()[:, None, :]).reshape(n, -1)  # (n, d·n//2)
    h = (values.reshape(-1, n) @ fused).view(*values.shape[:-1], D, w0.shape[0]) + b0
    return FeatureAggregation._finish(h, params)[..., 0]


class FeedForward(RandomDraws, nn.Module):
    """``Linear(W, F) -> ReLU -> Dropout -> Linear(F, W)`` (legacy ``feedforward.0`` / ``.3``).

    ``x`` (T, B, W), or (``full_T`` given) the last position of full_T (the lean last layer: the
    dropout mask of the full (full_T, B, F) activation is drawn when ``legacy_rng``)."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor, full_T: int | None = None) -> Tensor:
        h = torch.relu(self.fc1(x))
        if full_T is None:
            h = dropout(h, self.drop.p, self.training, self.legacy_rng)
        else:
            h = dropout_last(h, self.drop.p, self.training, self.legacy_rng, (full_T, *h.shape[1:]))
        return self.fc2(h)


class ClassifierHead(RandomDraws, nn.Module):
    """``Linear(in, hidden) -> ReLU -> Dropout -> Linear(hidden, out)`` (legacy ``clf`` and
    ``gate_score``; the dual gate adds a softmax in its caller)."""

    def __init__(self, width: int, hidden: int, n_out: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(dropout(torch.relu(self.fc1(x)), self.drop.p, self.training, self.legacy_rng))
