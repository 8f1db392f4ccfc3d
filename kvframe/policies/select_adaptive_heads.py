"""AdaKV head-adaptive selection: one budget per layer, shared jointly by its heads.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation" (arXiv
2407.11550). Within a row, the layer keeps the ``sum_h budget_h`` highest scores jointly over all
heads, so heads with peaky attention keep fewer slots and flat heads keep more. Each head first
gets ``floor(alpha * budget_h)`` of its own best slots (kvpress's safeguard, alpha = 0.2). The result
is ragged: heads keep different numbers of slots, stored as a padded layout with a validity mask.
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

    def select(self, scores: Tensor, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> Selection:
        b, h, t = scores.shape
        valid = state.valid
        guaranteed = topk_mask(scores, torch.floor(budgets.float() * self.alpha).long(), valid)
        s = scores.float().masked_fill(~valid, float("-inf")).masked_fill(guaranteed, float("inf"))
        total = budgets.sum(-1)  # [B]
        k = int(total.max())
        flat = s.reshape(b, h * t)
        top = flat.topk(min(k, h * t), dim=-1).indices
        ok = torch.arange(top.shape[-1], device=scores.device) < total[:, None]
        chosen = torch.zeros(b, h * t, dtype=torch.bool, device=scores.device)
        chosen.scatter_(-1, top, ok)
        chosen = chosen.reshape(b, h, t) & valid
        sel = keep_mask_to_selection(chosen)
        return fold_right(sel, valid) if self.fold == "right" else sel
