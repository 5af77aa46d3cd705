"""Small building blocks: feature aggregation, the position-wise feed-forward, classifier heads."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEAKY_SLOPE = 0.01


class FeatureAggregation(nn.Module):
    """Six Linear layers n -> n//2 -> n//4 -> n//8 -> n//16 -> n//32 -> 1 with LeakyReLU(0.01)
    between them, applied along the feature axis (legacy ``FeatureAggregation``).

    For n < 32 some widths are 0 and the output is the last bias alone (earlier layers get zero
    gradients) -- legacy behaviour, kept. :meth:`project_embeddings` fuses the first Linear with
    the embedding lookup.
    """

    def __init__(self, n_features: int):
        super().__init__()
        widths = [n_features, n_features // 2, n_features // 4, n_features // 8, n_features // 16,
                  n_features // 32, 1]
        with warnings.catch_warnings():  # zero-width layers for n < 32 are legacy behaviour
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def finish(self, h: Tensor) -> Tensor:
        """Apply layers 1..5 to the first layer's output ``h`` (..., n//2) -> (..., 1)."""
        for layer in self.layers[1:]:
            h = layer(F.leaky_relu(h, LEAKY_SLOPE))
        return h

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., n) -> (..., 1)."""
        return self.finish(self.layers[0](x))

    def aggregate_codes(self, codes: Tensor, table: Tensor, padding_idx: int | None = 0) -> Tensor:
        """Categorical features: ``codes`` (B, L, n) int codes into ``table`` (N, D) -> (B, L, D).

        The lookup is done in the transposed table so the gathered values come out feature-last,
        ``(D, B·L, n)``: the first Linear is then one plain matmul over the feature axis and the
        remaining layers act on ``(D·B·L, k)`` rows -- no permuted copy of the ``(B, L, n, D)``
        embeddings. Row ``padding_idx`` is read but gets no gradient (``F.embedding`` semantics).
        """
        *lead, n = codes.shape
        D = table.shape[1]
        if padding_idx is not None and table.requires_grad:
            p = padding_idx % table.shape[0]
            table = torch.cat([table[:p], table[p: p + 1].detach(), table[p + 1:]])
        gathered = table.t().contiguous().index_select(1, codes.reshape(-1))  # (D, B·L·n)
        first = self.layers[0]
        h = torch.addmm(first.bias, gathered.view(-1, n), first.weight.t())  # (D·B·L, n//2)
        out = self.finish(h).view(D, -1)  # (D, B·L)
        return out.t().reshape(*lead, D)

    def project_embeddings(self, codes_or_values: Tensor, rows: Tensor, values: Tensor | None = None
                           ) -> Tensor:
        """Aggregate embedded features without materialising the permuted (B, L, D, n) copy.

        Categorical: ``codes_or_values`` (B, L, n) int codes, ``rows`` the table (N, D).
        Numerical: ``values`` (B, L, n), ``rows`` (n, D) the numerical rows. Returns (B, L, D).
        """
        first = self.layers[0]
        if values is None:  # categorical: `rows` is the gathered (B, L, n, D); contract n in place
            h = torch.matmul(first.weight, rows).transpose(-1, -2) + first.bias  # (B, L, D, n//2)
        else:  # numerical: Σ_j x_j · row_j[d] · W[g, j], fused into one (n, D·g) matrix
            n, D = rows.shape
            fused = (rows[:, :, None] * first.weight.t()[:, None, :]).reshape(n, -1)  # (n, D·n//2)
            h = (values.reshape(-1, n) @ fused).view(*values.shape[:-1], D, first.out_features) + first.bias
        return self.finish(h)[..., 0]  # (B, L, D)


class FeedForward(nn.Module):
    """``Linear(W, F) -> ReLU -> Dropout -> Linear(F, W)`` (legacy ``feedforward.0`` / ``.3``)."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class ClassifierHead(nn.Module):
    """``Linear(in, hidden) -> ReLU -> Dropout -> Linear(hidden, out)`` (legacy ``clf`` and
    ``gate_score``; the dual gate adds a softmax in its caller)."""

    def __init__(self, width: int, hidden: int, n_out: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))
