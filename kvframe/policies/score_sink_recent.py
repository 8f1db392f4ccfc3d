"""StreamingLLM scorer: attention sinks plus the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453). The
first ``n_sink`` content tokens of each row score ``+inf``; every other slot scores its position,
so a top-k selection with budget ``B`` keeps the sinks and the ``B - n_sink`` most recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.policies.contracts import Ge
from kvframe.policies.groups import valid_rank
from kvframe.registry import register
from kvframe.slots import SlotState


@register("scorer", "sink_recent")
@dataclass
class SinkRecentScorer(Scorer):
    n_sink: Annotated[int, Ge(0)] = 4

    order_free = True

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        score = state.positions.float()
        rank, _ = valid_rank(state.valid, state.positions)  # by position: slots may be stored out of order
        sink = state.valid & (rank < self.n_sink)
        return score.masked_fill(sink, float("inf"))
