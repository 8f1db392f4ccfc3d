"""TOVA scorer (prefill variant): the last query's attention, averaged over all heads.

Oren et al., "Transformers are Multi-State RNNs" (arXiv 2401.06104). One score per position,
shared by every KV head of the layer (the average is over all query heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.registry import register
from kvframe.slots import SlotState


@register("scorer", "tova")
@dataclass
class TOVAScorer(Scorer):
    needs_queries = True
    order_free = True

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        rows = ctx.window_scores(state, 1, who="tova")  # [B, H, T]: the last query's attention, mean over G
        shared = rows.mean(dim=1)  # [B, T]
        return shared[:, None, :].expand(-1, state.num_heads, -1)
