"""Every key merge returns one type, :class:`MergedKeys`, with or without folded slots."""

from __future__ import annotations

import pytest
import torch

import kvframe
from kvframe import registry
from kvframe.policies import CompressionContext, MergedKeys, Selection
from kvframe.slots import SlotState

KEY_MERGES = [e for e in registry.list_policies() if e.kind == "key_merge" and e.origin == registry.BUILTIN]


def _state(b: int = 2, h: int = 2, t: int = 6, d: int = 4) -> SlotState:
    g = torch.Generator().manual_seed(0)
    state = SlotState.from_tensors(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g))
    # the statistics the built-in key merges read (window attention, key gradients)
    return state.with_stats(window_attn=torch.rand(b, h, t, generator=g), grad=torch.randn(b, h, t, d, generator=g))


def _selections(b: int = 2, h: int = 2) -> dict[str, Selection]:
    keep = torch.tensor([0, 2, 5]).expand(b, h, 3)
    keep_valid = torch.ones(b, h, 3, dtype=torch.bool)
    folded = torch.tensor([0, 1, 1, 2, 2, 2]).expand(b, h, 6)  # groups {0}, {1, 2}, {3, 4, 5}
    return {"evict": Selection(keep, keep_valid), "fold": Selection(keep, keep_valid, assign=folded)}


@pytest.mark.parametrize("entry", KEY_MERGES, ids=lambda e: e.name)
@pytest.mark.parametrize("how", ["evict", "fold"])
def test_key_merges_return_merged_keys(entry, how):
    merge = entry.obj()
    state = merge.observe(_state(), CompressionContext())
    selection = _selections()[how]
    kept = state.gather(selection.keep, selection.keep_valid)
    out = merge.merge(state, selection, kept, CompressionContext())
    assert isinstance(out, MergedKeys)
    assert out.keys.shape == kept.keys.shape and out.keys.dtype == kept.keys.dtype
    assert all(stat.shape[:3] == kept.valid.shape for stat in out.stats.values())
    if how == "evict":
        assert torch.equal(out.keys, kept.keys)  # nothing folded: every key kept bit for bit


def test_a_key_merge_returning_a_bare_tensor_is_named():
    """A key merge written for the old tensor-or-tuple result fails with a message saying what to return."""
    from dataclasses import dataclass

    from kvframe.compressor import Compressor
    from kvframe.errors import ConfigError
    from kvframe.policies import KeyMerge

    @dataclass
    class BareKeys(KeyMerge):
        name = "bare_keys"

        def merge(self, state, selection, kept, ctx):
            return kept.keys

    names = {"scorer": "knorm", "selector": "topk", "value_merge": "drop", "schedule": "uniform", "trigger": "after_prefill"}
    policies = {kind: registry.get_policy(kind, name)() for kind, name in names.items()}
    comp = Compressor(key_merge=BareKeys(), budget=0.5, compile=False, **policies)
    with pytest.raises(ConfigError, match=r"key_merge 'bare_keys' returned Tensor; a key merge returns .*MergedKeys"):
        kvframe.compress(comp, torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4))
