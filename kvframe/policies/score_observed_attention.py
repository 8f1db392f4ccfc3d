"""Observed-attention scorer: H2O's accumulated attention, prefill variant.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (arXiv 2306.14048): ``a_j = sum_t A_{t,j}`` over the prompt queries. As kvpress's
``ObservedAttentionPress`` does, the sum is divided by the number of queries that could see key
``j`` (so early keys are not favoured just for being visible longer), and averaged over the GQA
group. The attention rows are computed ``chunk`` queries at a time: memory stays
``O(chunk x T)``, never ``T x T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.registry import register
from kvframe.slots import SlotState


@register("scorer", "observed_attention")
@dataclass
class ObservedAttentionScorer(Scorer):
    chunk: int = 256
    normalize: bool = True

    needs_queries = True

    def __post_init__(self) -> None:
        self._check(isinstance(self.chunk, int) and self.chunk >= 1, "chunk", "an integer >= 1")

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        q = ctx.require_queries("observed_attention")
        b, hq, nq, d = q.shape
        h = state.num_heads
        g = hq // h
        scale = ctx.scaling if ctx.scaling is not None else 1.0 / math.sqrt(d)
        qpos = ctx.query_positions if ctx.query_positions is not None else torch.arange(nq).expand(b, nq)
        qval = ctx.query_valid if ctx.query_valid is not None else torch.ones(b, nq, dtype=torch.bool)
        qpos, qval = qpos.to(q.device), qval.to(q.device)
        keys = state.keys.float()
        total = torch.zeros(b, h, state.num_slots, device=q.device)
        seen = torch.zeros(b, h, state.num_slots, device=q.device)
        for s in range(0, nq, self.chunk):
            e = min(nq, s + self.chunk)
            qc = q[:, :, s:e].float().reshape(b, h, g, e - s, d)
            logits = torch.einsum("bhgwd,bhtd->bhgwt", qc, keys) * scale + state.log_weights[:, :, None, None, :]
            vis = state.valid[:, :, None, None, :] & (
                state.positions[:, :, None, None, :] <= qpos[:, None, None, s:e, None]
            )
            vis = vis & qval[:, None, None, s:e, None]
            probs = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
            total += probs.sum(dim=3).mean(dim=2)
            seen += vis[:, :, 0].sum(dim=2).float()
        if self.normalize:
            total = total / seen.clamp(min=1.0)
        return total
