"""SnapKV scorer: attention from an observation window of the last prompt tokens.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv 2404.14469).
``score_j = mean_{q in window} A_{q,j}``, averaged over the GQA group, then smoothed with a 1-D
pooling of width ``kernel`` along positions over the tokens before the window, zero-padded
(``avg``: kvpress and the SnapKV code's default; ``max`` also offered).

The window's own tokens rank above every token before the window, and among themselves by
recency (the most recent first); they count in the budget. So a budget at least the window keeps
the whole window plus the best earlier tokens (exactly the tokens SnapKV and kvpress keep), and a
budget below the window keeps the most recent part of the window, always including the last prompt
token. The ranking is finite and has no ties within a head: a window slot scores ``base + n - r``,
with ``r`` its recency rank in its head's window (0 for the most recent slot), ``n`` the largest
number of window slots of a head in the row and ``base`` an integer above every score
before the window in the row (over all heads, so that selectors comparing heads jointly, such as
AdaKV's, also rank every window slot first, and give a head's ``r``-th most recent window slot the
same score as every other head's). Ranks, not positions, are added, so the values stay exact in
float32 at any position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kvframe.policies.base import CompressionContext, Scorer
from kvframe.policies.contracts import Ge, Odd
from kvframe.registry import register
from kvframe.slots import SlotState


@register("scorer", "snapkv")
@dataclass
class SnapKVScorer(Scorer):
    window: Annotated[int, Ge(1)] = 64
    kernel: Annotated[int, Ge(1), Odd()] = 5
    pool: Literal["avg", "max"] = "avg"

    needs_queries = True

    def score(self, state: SlotState, ctx: CompressionContext) -> Tensor:
        # window attention summed over the window, averaged over the group and the valid window
        # queries (kvframe::window_scores); the pooling below is a cheap torch step on [B, H, T]
        score = ctx.window_scores(state, self.window, who="snapkv")  # [B, H, T] float32
        w = min(self.window, ctx.require_queries("snapkv").shape[2])
        if ctx.query_positions is not None:
            first = ctx.query_positions[:, -w:]
            if ctx.query_valid is not None:
                big = torch.iinfo(first.dtype).max
                first = torch.where(ctx.query_valid[:, -w:].to(first.device), first, big)
            first = first.min(dim=-1).values.to(state.positions.device)  # [B]
            in_window = state.valid & (state.positions >= first[:, None, None])
        else:
            in_window = torch.zeros_like(state.valid)
            in_window[..., -w:] = True
        if self.kernel > 1:
            # pool the scores of the tokens before the window only, zeros counted as padding (the
            # SnapKV code and kvpress): the window's own high attention must not leak into its
            # neighbours, and the first tokens are averaged over the full kernel
            b, h, t = score.shape
            flat = score.masked_fill(in_window | ~state.valid, 0.0).reshape(b * h, 1, t)
            pad = self.kernel // 2
            if self.pool == "avg":
                flat = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=True)
            else:
                flat = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
            score = flat.reshape(b, h, t)
        return window_first(score, in_window, state.valid)


def window_first(score: Tensor, in_window: Tensor, valid: Tensor) -> Tensor:
    """``score`` with the slots of ``in_window`` ranked above every other valid slot of their row and
    among themselves by recency (see the module docstring); slots are stored in position order."""
    before = score.masked_fill(in_window | ~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    base = torch.floor(torch.nan_to_num(before, neginf=0.0, posinf=0.0).clamp(min=0.0)) + 1.0
    count = in_window.sum(-1, keepdim=True)  # [B, H, 1] window slots per head
    recency = count - torch.cumsum(in_window.long(), dim=-1)  # 0 for the most recent window slot
    top = count.amax(dim=1, keepdim=True)  # [B, 1, 1]: the most recent slot of every head scores base + top
    return torch.where(in_window, base + (top - recency).float(), score)
