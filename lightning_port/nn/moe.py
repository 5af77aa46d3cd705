"""Top-2 mixture of experts with expert capacity (Shazeer et al. / tensor2tensor), as the legacy
model computes it, with index-based dispatch.

The input is a layer's ``(T, B, d)`` tensor; as in the legacy model the *group* over which expert
capacity is counted is the batch axis (one group per token position ``t``). The legacy code builds
a one-hot dispatch tensor ``(T, B, e, capacity)`` and contracts it with the input (memory and time
grow with B²); here every kept (token, expert) pair gets a slot index ``(expert, t, position)`` and
the expert inputs are gathered by index, so cost is linear in the batch. Expert buffers keep the
legacy layout ``(e, T·capacity, d)``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MOE_EVAL_POLICIES
from .draws import RandomDraws, uniform_coins

SECOND_THRESHOLD = 0.2  # legacy second_threshold (train and eval)
CAPACITY_FACTOR_TRAIN = 1.25
CAPACITY_FACTOR_EVAL = 2.0
MIN_EXPERT_CAPACITY = 4
GATE_EPS = 1e-9


def expert_capacity(group_size, capacity_factor: float, num_experts: int):
    """``max(min(n, int(n·cf/e)), 4)``, in integer arithmetic so it works for Python ints, symbolic
    sizes and integer tensors alike (``int(n·cf/e)`` equals ``n·p // (q·e)`` for cf = p/q)."""
    frac = Fraction(capacity_factor).limit_denominator(1000)
    raw = group_size * frac.numerator // (frac.denominator * num_experts)
    if isinstance(group_size, Tensor):
        return torch.clamp(torch.minimum(group_size, raw), min=MIN_EXPERT_CAPACITY)
    return max(min(group_size, raw), MIN_EXPERT_CAPACITY)


class MixtureOfExperts(RandomDraws, nn.Module):
    """Top-2 gated experts ``relu(x @ w1[k]) @ w2[k]`` (no biases); see the module docstring.

    Parameters: ``w_gate`` (d, e) [legacy ``gate.w_gating``], ``w1`` (e, d, F), ``w2`` (e, F, d)
    [legacy ``experts.w1/w2``]. Training always uses the legacy "random" second-expert policy and
    capacity factor 1.25; eval uses ``eval_policy`` and capacity factor 2.0 (no capacity limit
    when ``batch_invariant``).

    Two test hooks (class defaults leave the legacy function untouched): ``training_policy`` replaces
    the legacy "random" policy in training (the ``fast_path`` parity category compares training
    gradients of two RNG paths under a deterministic one), and ``trace``, when a list, receives
    ``(x, keep2)`` of every training-mode "random" call (the layer input and the coin decisions,
    before capacity), from which the coin-flip keep rate is tested against the legacy gate formula.
    """

    training_policy: str = "random"  # legacy; test hook (see the class docstring)
    trace: list | None = None  # test hook (see the class docstring)

    def __init__(self, dim: int, hidden: int, num_experts: int, eval_policy: str = "random",
                 batch_invariant: bool = False):
        super().__init__()
        if eval_policy not in MOE_EVAL_POLICIES:
            raise ValueError(f"eval_policy must be one of {MOE_EVAL_POLICIES}, got {eval_policy!r}.")
        self.num_experts = num_experts
        self.eval_policy = eval_policy
        self.batch_invariant = batch_invariant
        # legacy creation order: gate (randn), then w1, then w2, each uniform(±1/sqrt(last dim))
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts))
        self.w1 = nn.Parameter(_uniform_last_dim(torch.zeros(num_experts, dim, hidden)))
        self.w2 = nn.Parameter(_uniform_last_dim(torch.zeros(num_experts, hidden, dim)))

    def forward(self, x: Tensor, row_mask: Tensor | None = None, full_T: int | None = None) -> Tensor:
        """``x`` (T, B, d) -> (T, B, d). ``row_mask`` (B,) bool, optional: only those rows form
        the MoE group (capacity and positions counted over them); other rows get zeros. ``full_T``:
        ``x`` holds the last T of full_T positions (the lean last layer; every position is its own
        group, so the others are simply not computed); the legacy coin draw is still (full_T, B)."""
        T, B, d = x.shape
        e = self.num_experts
        policy = self.training_policy if self.training else self.eval_policy
        cf = CAPACITY_FACTOR_TRAIN if self.training else CAPACITY_FACTOR_EVAL

        probs = torch.softmax(x @ self.w_gate, dim=-1)  # (T, B, e)
        if e > 1:
            top_g, top_i = probs.topk(2, dim=-1)
            g1, g2, i1, i2 = top_g[..., 0], top_g[..., 1], top_i[..., 0], top_i[..., 1]  # (T, B)
        else:  # legacy: the "second" gate is 0, so the second expert is never kept
            g1, i1 = probs[..., 0], torch.zeros(T, B, dtype=torch.long, device=x.device)
            g2, i2 = torch.zeros_like(g1), i1
        denom = g1 + g2 + GATE_EPS
        g1, g2 = g1 / denom, g2 / denom

        # second-expert policy -> keep2 (T, B) bool, and the weight the second expert gets
        if policy == "random":
            # legacy: one (T, B) draw per call (in eval too; the fast path keeps it there)
            coin = uniform_coins(T, T if full_T is None else full_T, B, g2, self.legacy_rng or not self.training)
            keep2 = coin < g2 / SECOND_THRESHOLD
            if self.trace is not None and self.training:
                self.trace.append((x.detach(), keep2))
        elif policy == "threshold":
            keep2 = g2 > SECOND_THRESHOLD
        elif policy == "expected":
            keep2 = g2 > 0
            g2 = g2 * torch.clamp(g2 / SECOND_THRESHOLD, max=1.0)  # E[legacy coin] · g2
        elif policy == "all":
            keep2 = torch.ones_like(g2, dtype=torch.bool)
        else:  # "none"
            keep2 = torch.zeros_like(g2, dtype=torch.bool)
        if e == 1:
            keep2 = torch.zeros_like(keep2)

        # capacity and the buffer size of each expert
        if self.batch_invariant and not self.training:
            capacity, slots = None, B  # no limit: a position is always < B
        elif row_mask is not None:
            slots = expert_capacity(B, cf, e)  # upper bound, static
            capacity = expert_capacity(row_mask.sum().to(torch.long), cf, e)  # over kept rows
        else:
            capacity = slots = expert_capacity(B, cf, e)
        slots = min(slots, B) if capacity is None else slots

        keep1 = torch.ones_like(keep2)
        if row_mask is not None:
            keep1 = keep1 & row_mask[None, :]
            keep2 = keep2 & row_mask[None, :]
        # positions in group order (exclusive cumsum over the batch): first choices first, then
        # second choices after the kept first-choice count of their expert
        m1 = F.one_hot(i1, e) * keep1[..., None]  # (T, B, e)
        pos1 = ((m1.cumsum(1) - m1) * m1).sum(-1)  # (T, B)
        if capacity is not None:
            keep1 = keep1 & (pos1 < capacity)
        count1 = (m1 * keep1[..., None]).sum(1, keepdim=True)  # (T, 1, e)
        m2 = F.one_hot(i2, e) * keep2[..., None]
        pos2 = ((m2.cumsum(1) - m2 + count1) * m2).sum(-1)
        if capacity is not None:
            keep2 = keep2 & (pos2 < capacity)
        g1 = g1 * keep1
        g2 = g2 * keep2

        # slot of each kept (token, expert) pair in the (e, T, slots) buffers. Every slot holds at most one
        # token and every token at most two slots, so dispatch and combine are gathers both ways (their
        # backward too, see _Dispatch / _Combine: no scatter-add). A token that is not kept points at slot 0
        # with gate 0; an empty slot computes token 0 and nobody reads it (gate 0, gradient 0).
        t_idx = torch.arange(T, device=x.device)[:, None]
        n_slots = e * T * slots
        slot1 = (i1 * T + t_idx) * slots + pos1.clamp(max=slots - 1)  # (T, B)
        slot2 = (i2 * T + t_idx) * slots + pos2.clamp(max=slots - 1)
        s1 = torch.where(keep1, slot1, 0).reshape(-1)  # (T·B,)
        s2 = torch.where(keep2, slot2, 0).reshape(-1)
        tokens = torch.arange(T * B, device=x.device)
        sentinel = torch.full_like(tokens, n_slots)  # not kept -> the extra slot, cut off below
        source = torch.zeros(n_slots + 1, dtype=torch.long, device=x.device)
        source = source.scatter(0, torch.where(keep1.reshape(-1), s1, sentinel), tokens)
        source = source.scatter(0, torch.where(keep2.reshape(-1), s2, sentinel), tokens)[:n_slots]  # slot -> token
        x2d = x.reshape(T * B, d)
        g1, g2 = g1.reshape(-1, 1), g2.reshape(-1, 1)
        # training: gather-only backward; otherwise (eval, export, tracing) plain gathers, autograd as usual
        differentiable = (self.training and torch.is_grad_enabled() and not torch.jit.is_tracing()
                          and (x.requires_grad or self.w1.requires_grad))
        if differentiable:
            keep1f, keep2f = keep1.reshape(-1, 1).to(x.dtype), keep2.reshape(-1, 1).to(x.dtype)
            expert_in = _Dispatch.apply(x2d, source, s1, s2, keep1f, keep2f)
        else:
            expert_in = x2d.index_select(0, source)
        hidden = torch.relu(torch.bmm(expert_in.view(e, T * slots, d), self.w1))  # (e, T·slots, F)
        expert_out = torch.bmm(hidden, self.w2).reshape(n_slots, d)
        if differentiable:
            out = _Combine.apply(expert_out, g1, g2, s1, s2, source, keep1.reshape(-1), keep2.reshape(-1))
        else:
            out = torch.addcmul(expert_out.index_select(0, s1) * g1, expert_out.index_select(0, s2), g2)
        out = out.view(T, B, d)
        if e == 1:
            # legacy quirk: with one expert the legacy einsum returns a (T, d, B)-ordered tensor, and the
            # dropout that follows draws its mask in memory order; match the layout so the masks line up
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
        return out


class _Dispatch(torch.autograd.Function):
    """``expert_in[s] = x[source[s]]``; backward by gathers, ``grad_x[t] = grad[s1[t]]·keep1[t] +
    grad[s2[t]]·keep2[t]`` (each slot holds one token; the rows of empty slots get no gradient: nothing
    reads their outputs)."""

    @staticmethod
    def forward(ctx, x2d: Tensor, source: Tensor, s1: Tensor, s2: Tensor, keep1: Tensor, keep2: Tensor) -> Tensor:
        ctx.save_for_backward(s1, s2, keep1, keep2)
        return x2d.index_select(0, source)

    @staticmethod
    def backward(ctx, grad: Tensor):
        s1, s2, keep1, keep2 = ctx.saved_tensors
        gx = grad.index_select(0, s1).mul_(keep1)
        gx.addcmul_(grad.index_select(0, s2), keep2)
        return gx, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """``out[t] = g1[t]·eo[s1[t]] + g2[t]·eo[s2[t]]`` (g = 0 where the choice is not kept); backward by
    gathers: ``grad_eo[s] = gate(s)·grad_out[source[s]]`` with ``gate(s)`` the gate of the choice holding slot
    s (0 for an empty slot), ``grad_g = <grad_out, eo[s]>``."""

    @staticmethod
    def forward(ctx, eo: Tensor, g1: Tensor, g2: Tensor, s1: Tensor, s2: Tensor, source: Tensor,
                keep1: Tensor, keep2: Tensor) -> Tensor:
        take1, take2 = eo.index_select(0, s1), eo.index_select(0, s2)
        n = eo.shape[0]
        sentinel = torch.full_like(s1, n)
        gate = eo.new_zeros(n + 1)  # the gate of the choice holding each slot
        gate = gate.scatter(0, torch.where(keep1, s1, sentinel), g1[:, 0])
        gate = gate.scatter(0, torch.where(keep2, s2, sentinel), g2[:, 0])[:n]
        ctx.save_for_backward(take1, take2, source, gate)
        return torch.addcmul(take1 * g1, take2, g2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        take1, take2, source, gate = ctx.saved_tensors
        g_eo = grad.index_select(0, source).mul_(gate[:, None])
        g_g1 = (grad * take1).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        g_g2 = (grad * take2).sum(-1, keepdim=True) if ctx.needs_input_grad[2] else None
        return g_eo, g_g1, g_g2, None, None, None, None, None


def _uniform_last_dim(t: Tensor) -> Tensor:
    bound = 1 / math.sqrt(t.shape[-1])
    return t.uniform_(-bound, bound)
