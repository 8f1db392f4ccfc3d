"""AdaKV head-adaptive selection: one budget per layer, shared jointly by its heads.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation" (arXiv
2407.11550). Within a row, the layer keeps ``sum_h budget_h`` slots chosen jointly over all heads,
so heads with peaky attention keep fewer slots and flat heads keep more. The result is ragged:
heads keep different numbers of slots, stored as a padded layout with a validity mask.

Selection in two steps, so that the per-head safeguard holds whatever the scores (ties included):

1. each head's guaranteed slots: its ``max(floor(alpha * budget_h), min(budget_h, 1))`` best slots
   (the paper's and kvpress's safeguard ``alpha * budget_h``, alpha = 0.2, and at least one slot
   for every head with a budget);
2. the remaining ``sum_h budget_h - guaranteed`` slots: the highest scores among every head's
   other valid slots, jointly.

Every head keeps at least its guaranteed slots (at most its content), and the row keeps exactly
``sum_h budget_h`` slots. With the SnapKV scorer, whose observation window ranks above every other
token and by recency within itself, a head's guaranteed slots are its most recent window tokens (the
last prompt token first), so no head loses the window even when budgets are below it; when every
head's budget covers the window, the kept slots are the same as a one-step joint top-k.
``fold: right`` folds every dropped slot into the next kept slot of its head (see ``topk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Selection, Selector
from kvframe.policies.contracts import Interval
from kvframe.policies.groups import fold_right
from kvframe.policies.select_topk import Fold, keep_mask_to_selection, topk_mask
from kvframe.registry import register
from kvframe.slots import SlotState


@register("selector", "adaptive_heads")
@dataclass
class AdaptiveHeadsSelector(Selector):
    alpha: Annotated[float, Interval(0, 1)] = 0.2
    fold: Fold = "none"

    order_free = True

    def select(self, scores: Tensor, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> Selection:
        b, h, t = scores.shape
        valid = state.valid
        budgets = budgets.long()
        floor = torch.floor(budgets.double() * float(self.alpha)).long()
        floor = torch.minimum(torch.maximum(floor, budgets.clamp(max=1)), budgets)
        guaranteed = topk_mask(scores, floor, valid)
        # the rest jointly over the heads' other valid slots; those always rank above the others,
        # even where a scorer gives -inf, so the row total is exact
        lowest = torch.finfo(torch.float32).min
        eligible = valid & ~guaranteed
        s = torch.where(eligible, scores.float().clamp(min=lowest), float("-inf"))
        rest = (budgets.sum(-1) - guaranteed.sum(dim=(1, 2))).clamp(min=0)  # [B]
        k = min(int(rest.max()), h * t) if rest.numel() else 0
        chosen = guaranteed.clone()
        if k > 0:
            top = s.reshape(b, h * t).topk(k, dim=-1).indices
            ok = torch.arange(k, device=scores.device) < rest[:, None]
            joint = torch.zeros(b, h * t, dtype=torch.bool, device=scores.device)
            joint.scatter_(-1, top, ok)
            chosen |= joint.reshape(b, h, t) & eligible
        sel = keep_mask_to_selection(chosen)
        return fold_right(sel, valid, state.positions) if self.fold == "right" else sel
