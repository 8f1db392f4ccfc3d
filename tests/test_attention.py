"""A slot with log-weight ln 2 attends exactly like two identical slots."""

from __future__ import annotations

import math

import torch

from kvframe.attention import _attend
from kvframe.slots import SlotState


def test_ln2_slot_equals_two_identical_slots():
    g = torch.Generator().manual_seed(0)
    b, h, hq, t, d = 2, 2, 4, 7, 16
    keys = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    values = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    query = torch.randn(b, hq, 3, d, generator=g, dtype=torch.float64)
    qpos = torch.tensor([[10, 11, 12]] * b)
    # duplicated: slot 3 appears twice; weighted: slot 3 once with log-weight ln 2
    dup_idx = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
    dup = SlotState.from_tensors(keys[:, :, dup_idx], values[:, :, dup_idx], positions=torch.tensor([0, 1, 2, 3, 3, 4, 5, 6]))
    lw = torch.zeros(b, h, t, dtype=torch.float64)
    lw[:, :, 3] = math.log(2.0)
    weighted = SlotState.from_tensors(keys, values).replace(log_weights=lw)
    out_dup = _attend(query, dup, qpos, None, None, heads_uniform=True)
    out_w = _attend(query, weighted, qpos, None, None, heads_uniform=False)
    torch.testing.assert_close(out_w, out_dup, atol=1e-12, rtol=0)


def test_log_weight_changes_output():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 1, 4, 8, generator=g)
    values = torch.randn(1, 1, 4, 8, generator=g)
    query = torch.randn(1, 1, 1, 8, generator=g)
    qpos = torch.tensor([[5]])
    plain = _attend(query, SlotState.from_tensors(keys, values), qpos, None, None, True)
    lw = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    biased = _attend(query, SlotState.from_tensors(keys, values, log_weights=lw), qpos, None, None, False)
    assert not torch.allclose(plain, biased)
