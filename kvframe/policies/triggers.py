"""Triggers: when a compressor runs.

- ``after_prefill``: once per layer, right after the pass that fills an empty cache with the prompt
  (the layer's attention output for the prompt is computed on the full cache first).
- ``per_chunk``: the prompt is fed in chunks of ``size`` tokens (by :func:`kvframe.attach`).
  With ``scoring_pass: none`` the cache is compressed after every chunk's pass. With ``forward`` or
  ``backward`` every chunk after the first runs twice, exactly as AsymKV/KVSlimmer do
  (``docs/methods.md#chunked-prefill-with-a-scoring-pass``): a scoring pass over the chunk on the
  current past (its attention, and for ``backward`` the gradient of the chunk's language-model loss
  with respect to the past's pre-RoPE keys, become slot statistics; the chunk's own keys and values
  are discarded), then
  compression of the past, then the real pass that appends the chunk. No compression during
  decoding, and none after the last chunk: the cache ends at most ``budget + size`` slots
  (plus the generated tokens).
- ``decode``: during decoding, every ``every`` generated tokens, whenever the cache holds more
  than its capacity (one eviction or merge per step with ``every: 1``); with ``prefill: true``
  also right after every multi-token pass (the prompt). During decoding a ratio budget refers to
  the prompt length, so the capacity stays fixed while tokens are generated.
- ``never``: no compression (the ``full`` baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from kvframe.policies.base import Trigger, TriggerEvent
from kvframe.policies.contracts import Ge, Note
from kvframe.registry import register


@register("trigger", "after_prefill")
@dataclass
class AfterPrefill(Trigger):
    def fires(self, event: TriggerEvent) -> bool:
        return event.slots_before == 0 and event.new_tokens > 1 and event.compressions == 0


@register("trigger", "per_chunk")
@dataclass
class PerChunk(Trigger):
    capacity = True
    size: Annotated[int, Ge(1), Note("tokens per chunk")] = 512
    scoring_pass: Literal["none", "forward", "backward"] = "none"  # type: ignore[assignment]

    @property
    def chunk_size(self) -> int:  # type: ignore[override]
        return self.size

    @property
    def headroom(self) -> int:
        return self.size

    def fires(self, event: TriggerEvent) -> bool:
        # with a scoring pass, compression runs between the scoring and the real pass (kvframe.chunked)
        return self.scoring_pass == "none" and event.new_tokens > 1


@register("trigger", "decode")
@dataclass
class Decode(Trigger):
    capacity = True
    every: Annotated[int, Ge(1), Note("decode steps")] = 1
    prefill: bool = True

    @property
    def headroom(self) -> int:
        return self.every

    def fires(self, event: TriggerEvent) -> bool:
        if event.new_tokens > 1:
            return self.prefill
        return event.decode_steps % self.every == 0


@register("trigger", "never")
@dataclass
class Never(Trigger):
    ever_fires = False

    def fires(self, event: TriggerEvent) -> bool:
        return False
