"""Window-attention scorer: the attention mass each slot received from the current chunk.

AsymKV (arXiv 2506.05410) and KVSlimmer (arXiv 2603.00907), the attention mass of their pair
scores (``docs/methods.md#pair-selection``):
``m_j = l_j * sum_{q in window} w_{q,j}``, summed over the query heads of the KV group. This is the
framework statistic ``window_attn`` (kvframe.stats): the probabilities include the slot's
log-weight ``ln l_j``, so the count factor is already in. With a ``per_chunk`` trigger that has a
scoring pass, the window is the chunk's scoring pass. Higher = more attended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.policies.base import CompressionContext, Scorer
from kvframe.registry import register
from kvframe.slots import SlotState


@register("scorer", "window_attention")
@dataclass
class WindowAttentionScorer(Scorer):
    stats: ClassVar[tuple[str, ...]] = ("window_attn",)

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        mass = state.stats.get("window_attn")
        if mass is None:
            raise ConfigError(
                "scorer 'window_attention' needs the slot statistic 'window_attn' (attention of the last pass), "
                "which this state does not hold; use it inside kvframe.attach, or pass stats={'window_attn': ...} "
                "to kvframe.compress"
            )
        return mass.float()
