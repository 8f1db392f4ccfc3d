"""Top-k selection: each row and head keeps its ``budget`` highest-scoring slots, in position order.

With ``fold: right`` every dropped slot is folded into the next kept slot to its right instead of
vanishing (WeightedKV's "merge into the right neighbour", arXiv 2503.01330, Algorithm 1; slots after the
last kept slot of a head stay dropped). What folding does to keys and values is up to the merge
policies; with the ``drop`` merges it is plain eviction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Selection, Selector
from kvframe.policies.groups import fold_right, true_slots_first
from kvframe.registry import register
from kvframe.slots import SlotState


#: Where a dropped slot goes: nowhere, or into the next kept slot to its right.
Fold = Literal["none", "right"]


def keep_mask_to_selection(chosen: Tensor) -> Selection:
    """Turn a ``[B, H, T]`` bool mask of kept slots into a :class:`Selection` (ascending indices)."""
    t = chosen.shape[-1]
    s = max(int(chosen.sum(-1).max()), 1) if chosen.numel() else 1
    order = true_slots_first(chosen)[..., :s]
    keep_valid = order < t
    return Selection(keep=torch.where(keep_valid, order, 0), keep_valid=keep_valid)


def topk_mask(scores: Tensor, budgets: Tensor, valid: Tensor) -> Tensor:
    """``[B, H, T]`` mask of each head's ``budgets[b, h]`` best valid slots."""
    t = scores.shape[-1]
    k = min(int(budgets.max()), t) if budgets.numel() else 0
    s = scores.float().masked_fill(~valid, float("-inf"))
    chosen = torch.zeros_like(valid)
    if k == 0:
        return chosen
    top = s.topk(k, dim=-1).indices
    rank = torch.arange(k, device=scores.device)
    ok = rank < budgets[..., None]
    chosen.scatter_(-1, top, ok)
    return chosen & valid


@register("selector", "topk")
@dataclass
class TopKSelector(Selector):
    fold: Fold = "none"

    order_free = True  # top-k is by score; folding goes right by position

    def select(self, scores: Tensor, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> Selection:
        sel = keep_mask_to_selection(topk_mask(scores, budgets, state.valid))
        if self.fold == "right":
            sel = fold_right(sel, state.valid, state.positions)
        return sel
