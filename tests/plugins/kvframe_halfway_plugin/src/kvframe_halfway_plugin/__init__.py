"""A plugin that fails halfway: it registers a scorer and a card folder, then raises ``SystemExit(3)``.

kvframe must report it as broken, keep running, and leave none of its names registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def register() -> Path:
    from kvframe import register as kv_register
    from kvframe.policies import Scorer
    from kvframe.registry import register_cards

    @kv_register("scorer", "halfway_scorer")
    @dataclass
    class HalfwayScorer(Scorer):
        def score(self, state, ctx):
            return state.positions.float()

    register_cards(Path(__file__).parent / "cards")
    raise SystemExit(3)
