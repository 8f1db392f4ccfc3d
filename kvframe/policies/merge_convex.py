"""Convex value merge: WeightedKV (Yuan et al., arXiv 2503.01330, Section III-B, Algorithm 1).

A kept slot's value becomes the convex combination of its own value and the values folded into it,
weighted by each token's *average* attention score (``docs/methods.md#weightedkv``):

    v_new = (sum_i abar_i v_i + abar_k v_k) / (sum_i abar_i + abar_k)

For one evicted token this is the paper's ``(abar_{j*} V[j*] + abar_{j*+1} V[j*+1]) / (abar_{j*} +
abar_{j*+1})``, the renormalised first-order approximation of the ideal merge (Sec. III-B). When
several slots fold into the same kept slot at once (a multi-token compression, e.g. after the
prompt) they are combined in one convex step, which equals applying the single-merge rule to
their weighted mean. The kept slot keeps its own key, log-weight and statistics (the paper does not
combine statistics). If every weight of a group is zero the kept slot's value is unchanged.

``weights``: ``mean_attention`` (``attn / age``, the paper), ``attention`` (accumulated ``attn``),
or ``uniform`` (plain mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.kernels.compact import group_reduce
from kvframe.policies.base import CompressionContext, Selection, ValueMerge
from kvframe.registry import register
from kvframe.slots import SlotState

SlotWeights = Literal["mean_attention", "attention", "uniform"]


def convex_merge(values: Tensor, weight: Tensor, assign: Tensor, kept_values: Tensor) -> Tensor:
    """Weighted mean of each group's values ``[B, H, S, D]`` (kept value where the weights sum to 0)."""
    w = torch.where(assign >= 0, weight.float(), 0.0)
    s = kept_values.shape[2]
    num, den, members = group_reduce(values, w, assign, s)  # one kvframe::group_reduce pass
    out = num / den.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    merged = (den > 0) & (members > 1)  # slots nothing was folded into keep their value bit-exactly
    return torch.where(merged[..., None], out.to(kept_values.dtype), kept_values)


@register("value_merge", "convex")
@dataclass
class ConvexValueMerge(ValueMerge):
    weights: SlotWeights = "mean_attention"

    stats = ("attn", "age")
    order_free = True

    def in_place_reach(self) -> int:
        return 0  # a kept slot's value depends on its own group only

    def slot_weights(self, state: SlotState) -> Tensor:
        if self.weights == "uniform":
            return state.valid.float()
        if "attn" not in state.stats:
            raise ConfigError("value_merge 'convex' needs the accumulated attention statistic 'attn'; none was kept")
        attn = state.stats["attn"].float()
        if self.weights == "attention":
            return attn
        return attn / state.stats["age"].float().clamp(min=1.0)

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> tuple[Tensor, Tensor]:
        if selection.assign is None:
            return kept.values, kept.log_weights
        w = torch.where(state.valid, self.slot_weights(state), 0.0)
        return convex_merge(state.values, w, selection.assign, kept.values), kept.log_weights
