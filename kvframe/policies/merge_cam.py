"""CaM value merge: "Cache Merging" (Zhang et al., ICML 2024; code ``zyxxmu/cam``; ``docs/methods.md#cam``).

Applied on top of an eviction (StreamingLLM or H2O selection). When slot ``e`` is evicted, its value
is spread into the next ``m`` kept values (in cache order) with probability

    p = clip(A_e / mean_{i in next m} A_i, 0, 1)

where ``A`` is the accumulated attention (statistic ``attn``). On success each of those values gets
``+ v_e / m``; the key is dropped. The draw is Bernoulli from the cache's seeded generator, so a run
is reproducible. Near the end of the cache fewer than ``m`` kept slots may follow ``e``: the value
is then spread over the ones that exist (``v_e / count``), so no mass is lost to missing slots
(our choice; the reference code only merges in the middle of the cache). Several evictions at once
(after the prompt) are each spread independently from the values before the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Selection, ValueMerge
from kvframe.policies.contracts import Ge, Note
from kvframe.policies.groups import kept_assign
from kvframe.registry import register
from kvframe.slots import SlotState


@register("value_merge", "cam")
@dataclass
class CaMValueMerge(ValueMerge):
    m: Annotated[int, Ge(1), Note("kept slots an evicted value is spread over")] = 16

    stats = ("attn",)

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> tuple[Tensor, Tensor]:
        t = state.num_slots
        s = kept.num_slots
        assign = selection.assign if selection.assign is not None else kept_assign(selection.keep, selection.keep_valid, t)
        evicted = state.valid & (assign < 0)
        if not bool(evicted.any()):
            return kept.values, kept.log_weights
        attn = state.stats.get("attn", torch.zeros_like(state.log_weights)).float()
        kept_attn = torch.where(kept.valid, kept.stats.get("attn", torch.zeros_like(kept.log_weights)).float(), 0.0)
        n_kept = kept.valid.sum(-1, keepdim=True)  # [B, H, 1]
        # first kept slot after each evicted slot: number of kept slots before it
        keep_sorted = torch.where(selection.keep_valid, selection.keep, t)
        pos = torch.arange(t, device=state.keys.device).expand_as(attn).contiguous()
        first = torch.searchsorted(keep_sorted.contiguous(), pos, right=True)  # [B, H, T]
        count = (n_kept - first).clamp(min=0, max=self.m)
        csum = torch.nn.functional.pad(kept_attn.cumsum(-1), (1, 0))
        upto = (first + count).clamp(max=s)
        mean = (csum.gather(-1, upto) - csum.gather(-1, first.clamp(max=s))) / count.clamp(min=1)
        p = torch.where(mean > 0, (attn / mean.clamp(min=1e-30)).clamp(0.0, 1.0), torch.ones_like(attn))
        u = torch.rand(p.shape, generator=ctx.generator, device=p.device) if ctx.generator is not None else torch.rand(p.shape, device=p.device)
        success = evicted & (count > 0) & (u < p)
        share = torch.where(success[..., None], state.values.float() / count.clamp(min=1)[..., None].float(), 0.0)
        out = kept.values.float().clone()
        d = out.shape[-1]
        for off in range(self.m):
            idx = first + off
            ok = success & (off < count)
            target = torch.where(ok, idx, s)  # extra column collects nothing-to-do
            buf = torch.zeros(*out.shape[:2], s + 1, d, device=out.device)
            buf.scatter_add_(2, target[..., None].expand(-1, -1, -1, d), share)
            out += buf[:, :, :s]
        return out.to(kept.values.dtype), kept.log_weights
