"""Pieces several benchmark scripts share: the built-in method cards, and one timed prefill."""

from __future__ import annotations

import time

import torch

import kvframe
from kvframe import registry
from kvframe.attach import cache_argument


def builtin_cards(exclude: tuple[str, ...] = ("full",)) -> list[str]:
    """Names of kvframe's own method cards (plugins' cards left out), minus ``exclude``."""
    return [name for name, _, origin in registry.list_methods() if origin == "built-in" and name not in exclude]


def timed_prefill(model, comp, ids) -> tuple[float, object]:
    """One prefill of ``ids`` through ``kvframe.attach(model, comp)``: ``(seconds, the SlotCache)``."""
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        cache = h.new_cache()
        t0 = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        dt = time.perf_counter() - t0
    return dt, cache
