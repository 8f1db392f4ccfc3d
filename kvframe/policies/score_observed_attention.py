"""Observed-attention scorer: H2O's accumulated attention, prefill variant.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (arXiv 2306.14048): ``a_j = sum_t A_{t,j}`` over the prompt queries. As kvpress's
``ObservedAttentionPress`` does, the sum is divided by the number of queries that could see key
``j`` (so early keys are not favoured just for being visible longer), and averaged over the GQA
group. The attention rows are computed ``chunk`` queries at a time: memory stays
``O(chunk x T)``, never ``T x T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.policies.contracts import Ge, Note
from kvframe.registry import register
from kvframe.slots import SlotState
from kvframe.stats import attention_mass


@register("scorer", "observed_attention")
@dataclass
class ObservedAttentionScorer(Scorer):
    chunk: Annotated[int, Ge(1), Note("queries per attention block")] = 256
    normalize: bool = True

    needs_queries = True

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        q = ctx.require_queries("observed_attention")
        b, hq, nq, _ = q.shape
        g = hq // state.num_heads
        qpos = ctx.query_positions if ctx.query_positions is not None else torch.arange(nq, device=q.device).expand(b, nq)
        qval = ctx.query_valid if ctx.query_valid is not None else torch.ones(b, nq, dtype=torch.bool, device=q.device)
        mass, seen = attention_mass(state, q, qpos, qval, ctx.scaling, chunk=self.chunk)
        total = mass / g  # attention summed over queries, averaged over the GQA group
        if self.normalize:
            total = total / seen.clamp(min=1.0)
        return total
