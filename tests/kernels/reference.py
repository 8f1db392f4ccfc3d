"""Plain-torch references the kernel tests compare against (test helpers, not library code)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvframe.policies.base import CompressionContext
from kvframe.slots import SlotState


def attention_rows(ctx: CompressionContext, state: SlotState, window: int) -> Tensor:
    """Attention probabilities of the last ``window`` queries of ``ctx`` over the slots.

    Returns ``[B, H_kv, G, w, T]`` in float32 (``G`` query heads per KV head), with the slots'
    log-weights added, invalid slots, keys after each query's position and keys outside the
    sliding window masked out; padding queries get all-zero rows. This is the computation SnapKV
    used before ``kvframe::window_scores`` existed, kept as that op's independent reference.
    """
    q = ctx.require_queries("attention_rows")
    w = min(window, q.shape[2])
    b, hq, _, d = q.shape
    h = state.num_heads
    g = hq // h
    qw = q[:, :, -w:, :].float().reshape(b, h, g, w, d)
    scale = ctx.scaling if ctx.scaling is not None else 1.0 / math.sqrt(d)
    logits = torch.einsum("bhgwd,bhtd->bhgwt", qw, state.keys.float()) * scale
    visible = state.valid[:, :, None, None, :]
    if ctx.query_positions is not None:
        qpos = ctx.query_positions[:, -w:].to(state.positions.device)
        visible = visible & (state.positions[:, :, None, None, :] <= qpos[:, None, None, :, None])
        if ctx.sliding_window is not None:
            visible = visible & (qpos[:, None, None, :, None] - state.positions[:, :, None, None, :] < ctx.sliding_window)
    logits = logits + state.log_weights[:, :, None, None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    rows = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    if ctx.query_valid is not None:
        rows = rows * ctx.query_valid[:, -w:].to(rows.device)[:, None, None, :, None]
    return rows
