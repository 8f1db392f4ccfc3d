"""Shared helpers of the key merges that work on pre-RoPE keys (AsymKV, KVSlimmer).

Slots store keys rotated at their positions. Merging keys is only meaningful before RoPE
(AsymKV's released code caches keys before RoPE), so a key merge un-rotates every key at its own
position, merges, and re-rotates the merged key at the merged slot's position (the position of
the group's last token, set by the compressor). Without a rotary service (plain-tensor use) the
stored keys are taken as pre-RoPE keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext, Selection
from kvframe.policies.groups import group_sum
from kvframe.slots import SlotState


def pre_rope_keys(state: SlotState, ctx: CompressionContext) -> Tensor:
    """``[B, H, T, D]`` float32 pre-RoPE keys of ``state`` (the stored keys if there is no RoPE)."""
    keys = state.keys.float()
    if ctx.rope is None:
        return keys
    return ctx.rope.unrotate(keys, state.positions.clamp(min=0), ctx.layer_idx)


def group_assign(selection: Selection, state: SlotState) -> Tensor:
    """``selection.assign`` with invalid slots dropped (``-1``)."""
    assert selection.assign is not None
    return torch.where(state.valid, selection.assign, -1)


def group_counts(assign: Tensor, num_kept: int) -> Tensor:
    """``[B, H, S]`` number of members of every group."""
    return group_sum((assign >= 0).long(), assign, num_kept)


def finish_keys(merged_pre: Tensor, multi: Tensor, kept: SlotState, ctx: CompressionContext) -> Tensor:
    """Keys of the kept slots: ``merged_pre`` (pre-RoPE, ``[B, H, S, D]``) re-rotated at the kept
    slots' positions where ``multi`` (groups of two or more valid members), else the kept key
    unchanged (a slot nothing was folded into keeps its key bit for bit)."""
    out = merged_pre
    if ctx.rope is not None:
        out = ctx.rope.rotate(merged_pre, kept.positions.clamp(min=0), ctx.layer_idx)
    take = multi & kept.valid
    return torch.where(take[..., None], out.to(kept.keys.dtype), kept.keys)
