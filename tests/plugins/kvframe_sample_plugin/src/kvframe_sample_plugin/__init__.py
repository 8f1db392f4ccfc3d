"""Sample kvframe plugin: registers the ``vnorm`` scorer and the ``vnorm_topk`` method card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def register() -> Path:
    """Entry point: import the policies (registering them) and return the cards folder."""
    import torch

    from kvframe import register as kv_register
    from kvframe.policies import Scorer

    @kv_register("scorer", "vnorm")
    @dataclass
    class ValueNormScorer(Scorer):
        """Keep the slots with the largest value norm (``power`` applied to the norm)."""

        power: float = 1.0

        def score(self, state, ctx):
            return state.values.float().norm(dim=-1) ** self.power

    del torch
    return Path(__file__).parent / "cards"
