"""Accumulated-attention scorer: H2O's heavy hitters during decoding, WeightedKV's average score.

- H2O (Zhang et al., arXiv 2306.14048): ``a_j = sum_t A_{t,j}``, the attention
  slot ``j`` has received from every query so far (prompt and generated tokens), kept up to date
  by kvframe's attention function (statistic ``attn``, summed over the KV group's query heads).
- WeightedKV (Yuan et al., arXiv 2503.01330, Algorithm 1; ``docs/methods.md#weightedkv``): the *average*
  ``a_j / n_j`` with ``n_j`` the number of steps the slot has been in the cache (statistic
  ``age``), with ``average: true``. Averaging over the GQA group instead of one head is our
  choice for GQA models (the paper uses a multi-head model): it does not change the ranking within a
  KV head.

Protected slots score ``+inf``: the first ``n_sink`` content tokens and the most recent ones.
``recent`` is a count (int) or, as a float in ``[0, 1]``, the fraction of the budget that the
protected ends (sinks and recent tokens together) take: H2O's 50/50 split of heavy hitters and
recent tokens is ``n_sink: 0, recent: 0.5``; WeightedKV's layout (4 sinks, 508 recent and a
512-slot merge region for a 1024-slot cache) is ``n_sink: 4, recent: 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Annotated

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.policies.contracts import Ge, Interval, Note
from kvframe.policies.groups import protected_mask
from kvframe.registry import register
from kvframe.slots import SlotState


#: Recent slots to protect: a number of tokens (an int), or a fraction of the budget (a float).
Recent = Annotated[int, Ge(0), Note("tokens")] | Annotated[float, Interval(0, 1), Note("a fraction of the budget")]


def recent_count(recent: float | int, n_sink: int, budgets: Tensor | None, content: Tensor) -> Tensor:
    """``[B, H]`` number of recent slots to protect (see module docstring)."""
    if isinstance(recent, Integral):
        return torch.full_like(content, int(recent))
    base = content if budgets is None else budgets
    return (torch.floor(base.double() * float(recent) + 0.5).long() - n_sink).clamp(min=0)


@register("scorer", "accumulated_attention")
@dataclass
class AccumulatedAttentionScorer(Scorer):
    n_sink: Annotated[int, Ge(0)] = 0
    recent: Recent = 0.5
    average: bool = False

    stats = ("attn", "age")
    order_free = True

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        attn = state.stats.get("attn")
        if attn is None:
            attn = torch.zeros_like(state.log_weights)
        score = attn / state.stats["age"].clamp(min=1.0) if self.average and "age" in state.stats else attn.clone()
        n_recent = recent_count(self.recent, self.n_sink, ctx.budgets, state.content_slots())
        protect = protected_mask(state.valid, self.n_sink, n_recent, state.positions)
        return score.float().masked_fill(protect, float("inf"))
