"""Group helpers shared by selectors and merges."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvframe.policies.groups import true_slots_first


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1
))
def test_true_slots_first_lists_true_indices_then_the_rest(rows):
    mask = torch.tensor(rows)
    t = mask.shape[-1]
    out = true_slots_first(mask)
    for r, row in enumerate(rows):
        true = [i for i, m in enumerate(row) if m]
        rest = [i + t for i, m in enumerate(row) if not m]
        assert out[r].tolist() == true + rest
    ar = torch.arange(t)
    assert torch.equal(out, torch.where(mask, ar, ar + t).sort(dim=-1).values)  # the expression it replaces
