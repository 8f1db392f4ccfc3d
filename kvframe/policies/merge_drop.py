"""Drop merges: dropped slots vanish; kept slots keep their key, value and log-weight (eviction)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvframe.policies.base import CompressionContext, KeyMerge, MergedKeys, Selection, ValueMerge
from kvframe.registry import register
from kvframe.slots import SlotState


@register("key_merge", "drop")
@dataclass
class DropKeys(KeyMerge):
    order_free = True

    def in_place_reach(self) -> int:
        return 0  # a kept slot keeps its own key and value

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> MergedKeys:
        return MergedKeys(kept.keys)


@register("value_merge", "drop")
@dataclass
class DropValues(ValueMerge):
    order_free = True

    def in_place_reach(self) -> int:
        return 0  # a kept slot keeps its own key and value

    def merge(
        self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext
    ) -> tuple[Tensor, Tensor]:
        return kept.values, kept.log_weights
