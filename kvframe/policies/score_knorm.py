"""KNorm scorer: keep the keys with the lowest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv 2406.11430): ``score_j = -||k_j||_2``. Low-norm keys correlate with high attention. Needs
no attention weights. RoPE is a rotation, so the norm of the stored (rotated) key is the norm of
the pre-RoPE key.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.registry import register
from kvframe.slots import SlotState


@register("scorer", "knorm")
@dataclass
class KNormScorer(Scorer):
    order_free = True

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        return -state.keys.float().norm(dim=-1)
