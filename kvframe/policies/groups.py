"""Helpers for selections that fold slots into kept slots (merge groups) and protect slots by rank.

A *group* is a kept slot plus every input slot whose ``Selection.assign`` points at it. Merge
policies reduce over groups with :func:`group_sum`; selectors build ``assign`` with
:func:`fold_right` or by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvframe.policies.base import Selection
from kvframe.slots import position_order, position_rank, true_slots_first

__all__ = [
    "fold_right",
    "group_amax",
    "group_sum",
    "kept_assign",
    "position_order",
    "position_rank",
    "protected_mask",
    "true_slots_first",
    "valid_rank",
]


def valid_rank(valid: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(rank, rank_from_end)`` of every slot among the valid slots of its head (0-based).

    With ``positions``, ranks follow positions (rank 0 is the oldest content token wherever it is
    stored); without, they follow slot order, for states known to be in position order (a chunked
    prefill's). Invalid slots get ranks too (meaningless); mask them with ``valid``.
    """
    if positions is None:
        csum = torch.cumsum(valid.long(), dim=-1)
        return csum - 1, csum[..., -1:] - csum
    rank = position_rank(valid, positions)
    return rank, valid.sum(-1, keepdim=True) - 1 - rank


def protected_mask(valid: Tensor, n_sink: int, n_recent: Tensor | int, positions: Tensor | None = None) -> Tensor:
    """``[B, H, T]`` true for the first ``n_sink`` and the last ``n_recent`` valid slots of each head
    (by position when ``positions`` is given, else by slot order)."""
    rank, rank_end = valid_rank(valid, positions)
    if isinstance(n_recent, Tensor):
        n_recent = n_recent[..., None]
    return valid & ((rank < n_sink) | (rank_end < n_recent))


def group_sum(x: Tensor, assign: Tensor, num_kept: int) -> Tensor:
    """Sum ``x`` ``[B, H, T, *]`` over each group: ``[B, H, S, *]``. Dropped slots (-1) are ignored."""
    b, h, t = assign.shape
    extra = x.shape[3:]
    out = x.new_zeros(b, h, num_kept + 1, *extra)  # last column collects dropped slots
    idx = torch.where(assign >= 0, assign, num_kept)
    full = idx.reshape(b, h, t, *([1] * len(extra))).expand(b, h, t, *extra)
    out.scatter_add_(2, full, x)
    return out[:, :, :num_kept]


def group_amax(x: Tensor, assign: Tensor, num_kept: int, fill: float | int) -> Tensor:
    """Maximum of ``x`` ``[B, H, T]`` over each group: ``[B, H, S]`` (``fill`` for empty groups)."""
    b, h, _ = assign.shape
    out = torch.full((b, h, num_kept + 1), fill, dtype=x.dtype, device=x.device)
    idx = torch.where(assign >= 0, assign, num_kept)
    out.scatter_reduce_(2, idx, x, reduce="amax", include_self=True)
    return out[:, :, :num_kept]


def kept_assign(keep: Tensor, keep_valid: Tensor, num_slots: int) -> Tensor:
    """``[B, H, T]`` assignment in which every kept slot maps to itself and every other slot is dropped."""
    b, h, s = keep.shape
    assign = torch.full((b, h, num_slots + 1), -1, dtype=torch.long, device=keep.device)
    src = torch.arange(s, device=keep.device).expand(b, h, s)
    # filler entries write into the extra last column, which is cut off
    assign.scatter_(2, torch.where(keep_valid, keep, num_slots), torch.where(keep_valid, src, -1))
    assign = assign[:, :, :num_slots]
    return assign


def fold_right(selection: Selection, valid: Tensor, positions: Tensor | None = None) -> Selection:
    """Fold every dropped valid slot into the next kept slot to its right (WeightedKV, CaM-style
    neighbours). Dropped slots after the last kept slot of their head stay dropped. "Right" is by
    position when ``positions`` is given (slots may be stored out of order), else by slot order."""
    t = valid.shape[-1]
    assign = kept_assign(selection.keep, selection.keep_valid, t)
    order = None if positions is None else position_order(valid, positions)
    a = assign if order is None else assign.gather(-1, order)
    v = valid if order is None else valid.gather(-1, order)
    kept = a >= 0
    # the next kept slot at or after each (sorted) slot: reverse cumulative minimum of its index
    big = torch.iinfo(torch.long).max
    ar = torch.arange(t, device=valid.device).expand_as(a)
    nxt = torch.where(kept, ar, big).flip(-1).cummin(dim=-1).values.flip(-1)
    folded = torch.where(v & ~kept & (nxt != big), a.gather(-1, nxt.clamp(max=t - 1)), -1)
    a = torch.where(kept, a, folded)
    if order is not None:
        a = torch.empty_like(a).scatter_(-1, order, a)
    return Selection(selection.keep, selection.keep_valid, assign=a, weight=selection.weight)
