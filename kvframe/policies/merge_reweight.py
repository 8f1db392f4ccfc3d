"""BalanceKV value merge: kept samples stand for ``2^T`` tokens (sample weights from the selector).

"BalanceKV: KV Cache Compression through Discrepancy Theory" / "Streaming Attention Approximation
via Discrepancy Theory" (arXiv 2502.07861; released code ``ksheth96/BalanceKV``, ``src/llama_forward.py``);
see ``docs/methods.md#weights-values-and-logit-bias``.

For a kept middle slot with accumulated walk weight ``w_j`` after ``T`` halving rounds:

- ``bias: code`` (default, what the released code does and what its numbers come from): the value
  is multiplied by ``w_j / 2^T`` and the logit bias is ``ln 2^T``. Numerator weight ``w_j``,
  normaliser weight ``2^T``: tokens with ``w_j < 2^T`` are down-weighted in the numerator only.
- ``bias: consistent`` (the paper's estimator): the value is unchanged and the bias is ``ln w_j``,
  so numerator and normaliser use the same weight.

Sinks and window slots are exact (weight 1, unchanged). The weights come from a
:class:`~kvframe.policies.select_balanced_walk.WeightedSelection` (selectors ``balanced_walk`` and
``uniform_halving``); keys are kept as they are (key merge ``drop``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.policies.base import CompressionContext, Selection, ValueMerge
from kvframe.policies.select_balanced_walk import WeightedSelection
from kvframe.registry import register
from kvframe.slots import SlotState

@register("value_merge", "reweight")
@dataclass
class ReweightValues(ValueMerge):
    bias: Literal["code", "consistent"] = "code"

    def merge(
        self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext
    ) -> tuple[Tensor, Tensor]:
        if not isinstance(selection, WeightedSelection) or selection.weight is None or selection.full_weight is None:
            raise ConfigError(
                "value_merge 'reweight' needs the sample weights of selector 'balanced_walk' or 'uniform_halving'; "
                f"this compressor's selection ({type(selection).__name__}) has none"
            )
        w = selection.weight.float().gather(2, selection.keep)
        full = selection.full_weight.float().gather(2, selection.keep)
        valid = kept.valid
        if self.bias == "code":
            values = (kept.values.float() * (w / full)[..., None]).to(kept.values.dtype)
            log_w = kept.log_weights + torch.log(full)
        else:
            values = kept.values
            log_w = kept.log_weights + torch.log(w)
        values = torch.where(valid[..., None], values, kept.values)
        log_w = torch.where(valid, log_w, kept.log_weights)
        return values, log_w
