"""Sum value merge with counts: the lossless value side of AsymKV and KVSlimmer.

AsymKV (arXiv 2506.05410; KVSlimmer, arXiv 2603.00907, reuses it); see
``docs/methods.md#summed-values-and-the-count-clamp``. A group's summed value is ``V = sum_i V_i``
and its count ``l = sum_i l_i``; stored in kvframe's bias + mean form: log-weight ``ln l`` and value
``V / l``. The cardinality-aware softmax over such slots equals plain attention whenever the merged
tokens share a key (``docs/methods.md#merged-slots-and-counts``): all of the approximation is in
the key merge.

``clamp`` (default 5, the code's; ``null`` disables it) caps every kept slot's count after the
merge, as the released code does: the log-weight becomes ``ln min(l, clamp)`` while the value keeps
the whole sum (stored as ``V / min(l, clamp)``), so a slot standing for more than ``clamp`` tokens is
under-weighted in the softmax denominator. In the code the counts also define positions (cumulative
sums), so the clamp there also compresses positions; kvframe keeps original positions (a merged slot
sits at its last token's position), so here the clamp affects only the weight, never positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from kvframe.kernels.compact import group_reduce
from kvframe.policies.base import CompressionContext, Selection, ValueMerge
from kvframe.policies.contracts import Ge, Note
from kvframe.policies.prerope import group_assign
from kvframe.registry import register
from kvframe.slots import SlotState


@register("value_merge", "sum")
@dataclass
class SumValueMerge(ValueMerge):
    clamp: Annotated[float | None, Ge(1), Note("a count, the code's 5; null for no clamp")] = 5.0

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> tuple[Tensor, Tensor]:
        s = kept.num_slots
        if selection.assign is None:
            count = kept.log_weights.float().exp()
            vsum = kept.values.float() * count[..., None]
            single = kept.valid
        else:
            assign = group_assign(selection, state)
            c = torch.where(state.valid, state.log_weights.float().exp(), 0.0)
            # one kvframe::group_reduce pass: sum_i c_i v_i, sum_i c_i and the member count per group
            vsum, count, members = group_reduce(state.values, c, assign, s)
            single = members <= 1
        capped = count if self.clamp is None else count.clamp(max=float(self.clamp))
        values = (vsum / capped.clamp(min=1e-30)[..., None]).to(kept.values.dtype)
        log_weights = capped.clamp(min=1e-30).log()
        # slots nothing was folded into and that the clamp leaves alone keep their bits
        same = ~kept.valid | (single & (capped == count))
        values = torch.where(same[..., None], kept.values, values)
        log_weights = torch.where(same, kept.log_weights, log_weights)
        return values, log_weights.float()
