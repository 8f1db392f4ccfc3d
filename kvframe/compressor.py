"""A compressor: one policy of each kind, plus a budget and a position mode.

Its :meth:`Compressor.compress` is a pure function of tensors (a :class:`SlotState` and a
:class:`CompressionContext` in, a smaller :class:`SlotState` out), so it can be checked on plain
tensors and compiled. Build one by name or from YAML with :func:`kvframe.build`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvframe.errors import ConfigError
from kvframe.policies.base import (
    BudgetSchedule,
    CompressionContext,
    KeyMerge,
    Scorer,
    Selector,
    Trigger,
    ValueMerge,
)
from kvframe.policies.budgets import check_budget
from kvframe.slots import SlotState

POSITION_MODES = ("original", "reindex")


@dataclass
class Compressor:
    """One scorer, selector, key merge, value merge, budget schedule and trigger.

    Attributes
    ----------
    budget:
        Ratio in ``(0, 1]`` or absolute number of tokens (see :mod:`kvframe.policies.budgets`).
    positions:
        ``"original"`` (default): new tokens continue at their original positions.
        ``"reindex"``: after each compression the kept slots are re-numbered ``0..n-1`` inside the
        cache (keys re-rotated) and new tokens continue from there, as StreamingLLM does to run past
        the model's context window.
    compress_sliding_layers:
        Whether sliding-window layers (Gemma3's local layers) are compressed too. They hold at most
        a window of tokens anyway, so by default only full-attention layers are compressed.
    """

    scorer: Scorer | None
    selector: Selector
    key_merge: KeyMerge
    value_merge: ValueMerge
    schedule: BudgetSchedule
    trigger: Trigger
    budget: float | int = 0.5
    positions: str = "original"
    compress_sliding_layers: bool = False
    name: str | None = None
    spec: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"positions={self.positions!r}; accepted: {', '.join(POSITION_MODES)}")
        if self.scorer is None and self.trigger.name != "never":
            raise ConfigError(
                f"compressor {self.name or '(unnamed)'} has no scorer; give one (e.g. scorer: knorm), "
                "or use trigger: never for no compression"
            )

    # ------------------------------------------------------------------------------------
    @property
    def policies(self) -> list[Any]:
        return [p for p in (self.scorer, self.selector, self.key_merge, self.value_merge, self.schedule, self.trigger) if p is not None]

    @property
    def compresses(self) -> bool:
        """False when the trigger never fires (the budget is then irrelevant)."""
        return self.trigger.ever_fires

    @property
    def needs_queries(self) -> bool:
        return any(p.needs_queries for p in self.policies)

    @property
    def needs_rope(self) -> bool:
        return self.positions == "reindex" or any(p.needs_rope for p in self.policies)

    def budgets(self, state: SlotState, ctx: CompressionContext) -> torch.Tensor:
        """``[B, H]`` content slots each row and head keeps after compression."""
        content = state.content_slots()
        return torch.minimum(self.schedule.budgets(self.budget, content, ctx).long(), content)

    def compress(self, state: SlotState, ctx: CompressionContext) -> SlotState:
        """Compress one layer's slots. Returns ``state`` itself when nothing would be dropped."""
        content = state.content_slots()
        budgets = self.budgets(state, ctx)
        if bool(state.valid.all()) and bool((budgets >= content).all()):
            return state
        if self.scorer is None:
            raise ConfigError(f"compressor {self.name or '(unnamed)'} has no scorer and cannot compress")
        scores = self.scorer.score(state, ctx).float()
        if scores.shape != state.valid.shape:
            raise ConfigError(
                f"scorer {self.scorer.name!r} returned scores of shape {tuple(scores.shape)}; expected {tuple(state.valid.shape)}"
            )
        selection = self.selector.select(scores, budgets, state, ctx)
        kept = state.gather(selection.keep, selection.keep_valid)
        keys = self.key_merge.merge(state, selection, kept, ctx)
        values, log_weights = self.value_merge.merge(state, selection, kept, ctx)
        return kept.replace(keys=keys, values=values, log_weights=log_weights)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved composition (what ``kvframe show`` prints)."""
        out: dict[str, Any] = {}
        for key in ("name", "paper", "url", "description"):
            if self.spec.get(key) is not None:
                out[key] = self.spec[key]
        out["budget"] = self.budget
        out["positions"] = self.positions
        out["compress_sliding_layers"] = self.compress_sliding_layers
        for kind, pol in (
            ("scorer", self.scorer),
            ("selector", self.selector),
            ("key_merge", self.key_merge),
            ("value_merge", self.value_merge),
            ("schedule", self.schedule),
            ("trigger", self.trigger),
        ):
            out[kind] = pol.to_dict() if pol is not None else None
        return out
