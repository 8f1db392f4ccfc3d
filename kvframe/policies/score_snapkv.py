"""SnapKV scorer: attention from an observation window of the last prompt tokens.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv 2404.14469).
``score_j = mean_{q in window} A_{q,j}``, averaged over the GQA group, then smoothed with a 1-D
pooling of width ``kernel`` along positions over the tokens before the window, zero-padded
(``avg``: kvpress and the SnapKV code's default; ``max`` also offered). The window's own tokens
score ``+inf`` so they are always kept (they count in the budget).
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
        return score.masked_fill(in_window, float("inf"))
