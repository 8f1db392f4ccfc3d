"""Random scorer: a seeded, reproducible baseline (uniform scores per slot)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.policies.contracts import Ge
from kvframe.registry import register
from kvframe.slots import SlotState


@register("scorer", "random")
@dataclass
class RandomScorer(Scorer):
    """Uniform random scores. ``seed`` and the layer index fix the draw, so runs repeat exactly."""

    seed: Annotated[int, Ge(0)] = 0

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
        s = torch.rand(state.valid.shape, generator=gen)
        return s.to(state.keys.device)
