"""Budget schedules: how many slots each layer and head keeps.

A budget is either a **ratio** (a float in ``(0, 1]``: the fraction of each row's content tokens to
keep, rounded half up, at least 1) or an **absolute** number of tokens (an int ``>= 1``). An absolute
budget larger than the prompt (the longest row's content) is an error; rows shorter than the
budget keep all their content. Budgets count every kept content slot, protected ones (sinks,
observation window) included; padding never counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Annotated, Any

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.policies.base import BudgetSchedule, CompressionContext
from kvframe.policies.contracts import Ge, NonEmpty, Note
from kvframe.registry import register


def check_budget(budget: Any, where: str = "budget") -> float | int:
    """Validate a budget value; returns it as ``int`` (tokens) or ``float`` (ratio)."""
    if isinstance(budget, bool) or not isinstance(budget, (Integral, Real)):
        raise ConfigError(
            f"{where}={budget!r} is not a number; accepted: a ratio in (0, 1] (e.g. 0.25) or a number of tokens >= 1 (e.g. 512)"
        )
    if isinstance(budget, Integral):
        if budget < 1:
            raise ConfigError(f"{where}={budget!r} tokens must be >= 1; accepted: a ratio in (0, 1] or a number of tokens >= 1")
        return int(budget)
    b = float(budget)
    if not math.isfinite(b) or b <= 0:
        raise ConfigError(f"{where}={budget!r} must be > 0; accepted: a ratio in (0, 1] or a number of tokens >= 1")
    if b > 1:
        if b.is_integer():
            raise ConfigError(
                f"{where}={budget!r} is > 1 as a ratio; accepted: a ratio in (0, 1], or an integer number of tokens "
                f"(write {int(b)} without a decimal point to keep {int(b)} tokens)"
            )
        raise ConfigError(
            f"{where}={budget!r} is > 1 as a ratio and not a whole number: it is neither a ratio in (0, 1] nor a whole "
            "number of tokens; accepted: a ratio in (0, 1] (e.g. 0.25) or an integer number of tokens >= 1 "
            "(e.g. 512)"
        )
    return b


def resolve_budget(budget: float | int, content: Tensor, where: str = "budget", strict: bool = True) -> Tensor:
    """Slots to keep (``[B, H]`` long) for ``content`` ``[B, H]`` tokens.

    With ``strict`` (one-shot compression after prefill) an absolute budget larger than the longest
    row is an error; otherwise (chunked prefill, decoding) it is a capacity not yet reached.
    """
    budget = check_budget(budget, where)
    content = content.long()
    if isinstance(budget, int) and not strict:
        return content.clamp(max=budget)
    if isinstance(budget, int):
        longest = int(content.max()) if content.numel() else 0
        if longest == 0:
            raise ConfigError(
                f"{where}={budget} tokens: the prompt has no content tokens (every token is padding), so there is "
                "nothing to keep; check the attention mask (or valid mask) marks the prompt's tokens"
            )
        if budget > longest:
            raise ConfigError(
                f"{where}={budget} tokens is larger than the prompt ({longest} tokens); accepted: 1..{longest} "
                "tokens, or a ratio in (0, 1]"
            )
        return content.clamp(max=budget)
    kept = torch.floor(content.double() * budget + 0.5).long().clamp(min=1)
    return torch.minimum(kept, content)


@register("schedule", "uniform")
@dataclass
class UniformSchedule(BudgetSchedule):
    """Every layer and head keeps the same budget."""

    def budgets(self, budget: float | int, content: Tensor, ctx: CompressionContext) -> Tensor:
        return resolve_budget(budget, content, strict=ctx.strict)


@register("schedule", "pyramid")
@dataclass
class PyramidSchedule(BudgetSchedule):
    """PyramidKV: per-layer budgets decreasing linearly with depth (arXiv 2406.02069).

    With the average per-layer capacity ``C`` (the resolved budget) and ``window`` protected
    tokens: ``min = (C - window) / beta``, ``max = 2 (C - window) - min``, and layer ``l`` keeps
    ``round(max - l (max - min) / (L - 1)) + window``, clipped to the content. The mean over layers
    is ``C`` (before clipping).
    """

    beta: Annotated[float, Ge(1)] = 20.0
    window: Annotated[int, Ge(0)] = 0

    def budgets(self, budget: float | int, content: Tensor, ctx: CompressionContext) -> Tensor:
        cap = resolve_budget(budget, content, strict=ctx.strict).double()
        w = torch.clamp(cap, max=float(self.window))
        lo = (cap - w) / self.beta
        hi = 2 * (cap - w) - lo
        n = max(ctx.num_layers - 1, 1)
        layer = hi - ctx.layer_idx * (hi - lo) / n
        kept = torch.floor(layer + 0.5).long() + w.long()
        return torch.minimum(kept.clamp(min=1), content.long())


@register("schedule", "explicit")
@dataclass
class ExplicitSchedule(BudgetSchedule):
    """Budgets given per layer, and optionally per head (ragged).

    ``layers`` has one entry per layer: a budget (ratio or tokens) for all heads of that layer, or
    a list with one budget per KV head. The compressor's own ``budget`` is not used.
    """

    # required: no list of budgets fits every model
    layers: Annotated[list[Any], NonEmpty(), Note("one budget, or a list of per-head budgets, per layer")]

    def validate(self) -> None:
        """Every entry is a budget, checked with the message of a budget."""
        for i, entry in enumerate(self.layers):
            items = entry if isinstance(entry, (list, tuple)) else [entry]
            for j, b in enumerate(items):
                check_budget(b, f"schedule.layers[{i}]" + (f"[{j}]" if isinstance(entry, (list, tuple)) else ""))

    def budgets(self, budget: float | int, content: Tensor, ctx: CompressionContext) -> Tensor:
        if len(self.layers) != ctx.num_layers:
            raise ConfigError(
                f"schedule 'explicit' has {len(self.layers)} layer budgets but the model has {ctx.num_layers} layers"
            )
        entry = self.layers[ctx.layer_idx]
        h = content.shape[1]
        if isinstance(entry, (list, tuple)):
            if len(entry) != h:
                raise ConfigError(
                    f"schedule 'explicit': layer {ctx.layer_idx} lists {len(entry)} head budgets but the layer has {h} KV heads"
                )
            cols = [
                resolve_budget(b, content[:, j : j + 1], f"schedule.layers[{ctx.layer_idx}][{j}]", strict=ctx.strict)
                for j, b in enumerate(entry)
            ]
            return torch.cat(cols, dim=1)
        return resolve_budget(entry, content, f"schedule.layers[{ctx.layer_idx}]", strict=ctx.strict)
