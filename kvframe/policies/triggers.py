"""Triggers: when a compressor runs.

- ``after_prefill``: once per layer, right after the pass that fills an empty cache with the prompt
  (the layer's attention output for the prompt is computed on the full cache first).
- ``never``: no compression (the ``full`` baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvframe.policies.base import Trigger, TriggerEvent
from kvframe.registry import register


@register("trigger", "after_prefill")
@dataclass
class AfterPrefill(Trigger):
    def fires(self, event: TriggerEvent) -> bool:
        return event.slots_before == 0 and event.new_tokens > 1 and event.compressions == 0


@register("trigger", "never")
@dataclass
class Never(Trigger):
    ever_fires = False

    def fires(self, event: TriggerEvent) -> bool:
        return False
