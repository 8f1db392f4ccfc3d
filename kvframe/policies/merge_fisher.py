"""Fisher key merge of AsymKV: a diagonal empirical-Fisher Newton step per dimension.

AsymKV (arXiv 2506.05410; released code ``the-scale-lab/Asymkv``, ``asymkv/method/asymkv.py``); see
``docs/methods.md#fisher-key-merge``. With ``F_i = g_i * g_i`` the squared gradient of
the chunk's language-model loss with respect to slot ``i``'s pre-RoPE key (framework statistic
``grad``, from a ``per_chunk`` trigger with ``scoring_pass: backward``), every group (a kept slot
and the slots folded into it) gets, per KV head and dimension ``e``::

    k[e] = sum_i F_i[e] k_i[e] / (sum_i F_i[e] + eps)          (eps = 1e-21, computed in float32)

the minimiser of ``1/2 sum_i sum_e F_i[e] (k[e] - k_i[e])^2``. For AsymKV's pairs this is exactly
the paper's formula. Keys are merged before RoPE and re-rotated at the merged slot's position (its
last token's). The merged slot's stored gradient is the sum of the raw (signed) gradients
``sum_i g_i``. Slots nothing was folded into keep their key and gradient unchanged.

Fallback (a deliberate deviation from the code's no-gradient branch; ``docs/methods.md#asymkv-choices``):
where a group's gradient is missing or not finite, its key is the plain average of its members'
keys; where ``sum_i F_i[e]`` is 0 for one dimension, that dimension is averaged. Values are *not*
averaged (the code's fallback halves them, contradicting the sum convention); the value merge keeps
summing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, KeyMerge, MergedKeys, Selection
from kvframe.policies.contracts import Interval
from kvframe.policies.groups import group_sum
from kvframe.policies.prerope import finish_keys, group_assign, group_counts, pre_rope_keys
from kvframe.registry import register
from kvframe.slots import SlotState


def fisher_merge(keys: Tensor, grad: Tensor, eps: float = 1e-21) -> Tensor:
    """Merge the keys ``[..., n, D]`` of one group with gradients ``[..., n, D]`` (diagonal-Fisher step)."""
    f = grad.float() ** 2
    return (f * keys.float()).sum(-2) / (f.sum(-2) + eps)


@register("key_merge", "fisher")
@dataclass
class FisherKeyMerge(KeyMerge):
    needs_rope: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("grad",)
    eps: Annotated[float, Interval(0, 1e-3, closed="[)")] = 1e-21

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> MergedKeys:
        if selection.assign is None:
            return MergedKeys(kept.keys)
        s = kept.num_slots
        assign = group_assign(selection, state)
        size = group_counts(assign, s)
        multi = size >= 2
        pre = pre_rope_keys(state, ctx)
        mean = group_sum(pre, assign, s) / size.clamp(min=1)[..., None]
        grad = state.stats.get("grad")
        if grad is None:
            return MergedKeys(finish_keys(mean, multi, kept, ctx))
        g = grad.float()
        finite = torch.isfinite(g)
        bad_group = group_sum((~finite).any(-1).long(), assign, s) > 0  # [B, H, S]
        f = torch.where(finite, g, 0.0) ** 2
        num = group_sum(f * pre, assign, s)
        den = group_sum(f, assign, s)
        fisher = num / (den + self.eps)
        use_mean = bad_group[..., None] | (den == 0)
        merged = torch.where(use_mean, mean, fisher)
        keys = finish_keys(merged, multi, kept, ctx)
        gsum = group_sum(g, assign, s).to(grad.dtype)  # raw gradients summed, not squared
        new_grad = torch.where((multi & kept.valid)[..., None], gsum, kept.stats["grad"])
        return MergedKeys(keys, {"grad": new_grad})
