"""CaM value merge: "Cache Merging" (Zhang et al., ICML 2024; code ``zyxxmu/cam``; ``docs/methods.md#cam``).

Applied on top of an eviction (StreamingLLM or H2O selection). When slot ``e`` is evicted, its value
is spread into the next ``m`` kept values (by position) with probability

    p = clip(A_e / mean_{i in next m} A_i, 0, 1)

where ``A`` is the accumulated attention (statistic ``attn``). On success each of those values gets
``+ v_e / m``; the key is dropped. The draw is Bernoulli from the cache's seeded generator, so a run
is reproducible: one uniform number per evicted slot and head, drawn in position order of the
evicted slots (so the draw does not depend on how the layer stores its slots, and an in-place
eviction draws exactly what a dense compression would). Near the end of the cache fewer than ``m``
kept slots may follow ``e``: the value is then spread over the ones that exist (``v_e / count``),
so no mass is lost to missing slots (our choice; the reference code only merges in the middle of
the cache). Several evictions at once (after the prompt) are each spread independently from the
values before the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Selection, ValueMerge
from kvframe.policies.contracts import Ge, Note
from kvframe.policies.groups import kept_assign, position_order, valid_rank
from kvframe.registry import register
from kvframe.slots import SlotState, true_slots_first


@register("value_merge", "cam")
@dataclass
class CaMValueMerge(ValueMerge):
    m: Annotated[int, Ge(1), Note("kept slots an evicted value is spread over")] = 16

    stats = ("attn",)

    order_free = True

    def in_place_reach(self) -> int:
        return self.m  # the next m kept slots of every evicted one

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> tuple[Tensor, Tensor]:
        t = state.num_slots
        s = kept.num_slots
        assign = selection.assign if selection.assign is not None else kept_assign(selection.keep, selection.keep_valid, t)
        evicted = state.valid & (assign < 0)
        n_evicted = int(evicted.sum(-1).max()) if evicted.numel() else 0
        if n_evicted == 0:
            return kept.values, kept.log_weights
        big = torch.iinfo(torch.long).max
        attn = state.stats.get("attn", torch.zeros_like(state.log_weights)).float()
        kept_attn = torch.where(kept.valid, kept.stats.get("attn", torch.zeros_like(kept.log_weights)).float(), 0.0)
        n_kept = kept.valid.sum(-1, keepdim=True)  # [B, H, 1]
        # kept slots by position; the first kept slot after each slot: how many kept slots precede it
        korder = position_order(kept.valid, kept.positions)
        kpos = torch.where(kept.valid, kept.positions, big).gather(-1, korder).contiguous()
        first = torch.searchsorted(kpos, torch.where(state.valid, state.positions, big).contiguous(), right=True)
        count = (n_kept - first).clamp(min=0, max=self.m)
        csum = torch.nn.functional.pad(kept_attn.gather(-1, korder).cumsum(-1), (1, 0))
        upto = (first + count).clamp(max=s)
        mean = (csum.gather(-1, upto) - csum.gather(-1, first.clamp(max=s))) / count.clamp(min=1)
        p = torch.where(mean > 0, (attn / mean.clamp(min=1e-30)).clamp(0.0, 1.0), torch.ones_like(attn))
        # one draw per evicted slot, in position order
        shape = (*p.shape[:2], n_evicted)
        u = torch.rand(shape, generator=ctx.generator, device=p.device) if ctx.generator is not None else torch.rand(shape, device=p.device)
        erank, _ = valid_rank(evicted, state.positions)
        u = u.gather(-1, erank.clamp(min=0, max=n_evicted - 1))
        success = evicted & (count > 0) & (u < p)
        # spread every evicted value over its next `count` kept slots, one scatter for all of them
        ev = true_slots_first(evicted)[..., :n_evicted]
        ev = torch.where(ev < t, ev, 0)  # padding entries: success is false there
        ok_e = success.gather(-1, ev)
        first_e, count_e = first.gather(-1, ev), count.gather(-1, ev)
        offs = torch.arange(self.m, device=p.device)
        ok = ok_e[..., None] & (offs < count_e[..., None])  # [B, H, E, m]
        korder_pad = torch.nn.functional.pad(korder, (0, 1), value=s)  # sorted index s: nothing to do
        sorted_idx = (first_e[..., None] + offs).clamp(max=s).flatten(2)
        target = torch.where(ok, korder_pad.gather(-1, sorted_idx).view_as(ok), s).flatten(2)  # [B, H, E*m]
        d = kept.values.shape[-1]
        share = (state.values.float().gather(2, ev[..., None].expand(-1, -1, -1, d)) / count_e.clamp(min=1)[..., None].float())
        share = share[:, :, :, None, :].expand(-1, -1, -1, self.m, -1).flatten(2, 3)  # [B, H, E*m, D]
        buf = torch.zeros(*kept.values.shape[:2], s + 1, d, device=p.device)
        buf.scatter_add_(2, target[..., None].expand(-1, -1, -1, d), share)
        out = kept.values.float() + buf[:, :, :s]
        return out.to(kept.values.dtype), kept.log_weights
