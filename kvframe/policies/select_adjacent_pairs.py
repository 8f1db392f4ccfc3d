"""Adjacent-pair selection of AsymKV and KVSlimmer: merge the least-attended neighbouring slots.

AsymKV (arXiv 2506.05410; ``AsymKVCache`` in the released code's ``asymkv/method/asymkv.py``) and
KVSlimmer (arXiv 2603.00907; ``kvslimmer/cache.py``); see ``docs/methods.md#pair-selection``. Per batch
row, one selection shared by all KV heads of the layer:

- slots are taken in position order among the row's *valid* slots (left padding may sit in front);
  the first ``n_sink`` of them are sinks and never touched; pair ``i`` is the two consecutive middle
  slots ``(j, j+1)`` with ``j = n_sink + i``;
- pair score ``P_i = sum_heads (m_j + m_{j+1}) / exp((i+1)/gamma)``, where ``m`` are the scores
  passed in (the ``window_attention`` scorer's count-weighted window attention mass, already summed
  over the query heads of each KV group, so summing over KV heads sums over all query heads);
  with ``count_factor`` it is multiplied by ``sum_heads (l_j + l_{j+1}) = H_kv (l_j + l_{j+1})``
  (AsymKV's count factor; KVSlimmer's code sums the counts over the whole sequence, a constant that
  does not change the ranking, so its card sets it off);
- the ``K = content - budget`` pairs with the smallest score are merged: ``j+1`` folds into ``j``.
  There is no protected recent window; the position penalty is the only recency mechanism
  (recent pairs get smaller scores and are merged first). Ties go to the older pair.

``overlap``:

- ``parity`` (default, as the released code): all picks are applied simultaneously. If pairs
  ``(j, j+1)`` and ``(j+1, j+2)`` are both picked, slot ``j`` takes ``j`` and ``j+1`` while slots
  ``j+1`` and ``j+2`` are removed: the overlapping pick turns into eviction of ``j+2`` (its value
  and count are lost). Exactly ``K`` slots go away either way.
- ``disjoint`` (ablation): pairs are picked greedily by ascending score, skipping pairs that share a
  slot with an earlier pick; nothing is evicted. If that runs out of pairs before ``K`` (the budget is
  too small for disjoint pairs), a ConfigError names the smallest budget it can reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.policies.base import CompressionContext, Selection, Selector
from kvframe.policies.contracts import Ge, Gt, Note
from kvframe.policies.groups import true_slots_first
from kvframe.registry import register
from kvframe.slots import SlotState

#: AsymKV's position temperature, ``4096 / ln 512`` (the released code's ``asymkv/method/asymkv.py``).
DEFAULT_GAMMA = 4096.0 / math.log(512.0)


@register("selector", "adjacent_pairs")
@dataclass
class AdjacentPairsSelector(Selector):
    n_sink: Annotated[int, Ge(0), Note("sink slots, never merged")] = 32
    gamma: Annotated[float | None, Gt(0), Note("position temperature; null for 4096/ln(512)")] = None
    count_factor: bool = True
    overlap: Literal["parity", "disjoint"] = "parity"

    @property
    def temperature(self) -> float:
        return DEFAULT_GAMMA if self.gamma is None else float(self.gamma)

    # ------------------------------------------------------------------------------------
    def pair_scores(self, scores: Tensor, state: SlotState) -> tuple[Tensor, Tensor, Tensor]:
        """Pair scores in valid-rank space.

        Returns ``(P, ok, slot)``: ``P`` ``[B, T-1]`` float64 score of the pair whose left slot has
        valid rank ``r`` (``+inf`` where ``ok`` is false: sinks, or no right neighbour), and ``slot``
        ``[B, H, T]`` the slot index of each valid rank (entries past a head's content are padding).
        """
        b, h, t = state.valid.shape
        ar = torch.arange(t, device=scores.device)
        key = true_slots_first(state.valid)
        slot = torch.where(key < t, key, key - t)  # valid slots first, in position order
        n = state.valid[:, 0].sum(-1)  # [B]
        rank_ok = ar[None, :] < n[:, None]  # [B, T]
        m = scores.double().gather(-1, slot).sum(1)  # [B, T] summed over KV heads
        m = torch.where(rank_ok, m, 0.0)
        r = ar[:-1]
        ok = (r[None, :] >= self.n_sink) & (r[None, :] + 1 < n[:, None])
        pair = (m[:, :-1] + m[:, 1:]) * torch.exp(-(r - self.n_sink + 1).double() / self.temperature)
        if self.count_factor:
            cnt = torch.where(rank_ok, state.log_weights.double().exp().gather(-1, slot).sum(1), 0.0)
            pair = pair * (cnt[:, :-1] + cnt[:, 1:])
        pair = pair.nan_to_num(nan=float("inf")).clamp(max=torch.finfo(torch.float64).max)
        pair = torch.where(ok, pair, float("inf"))
        return pair, ok, slot

    def select(self, scores: Tensor, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> Selection:
        b, h, t = state.valid.shape
        content = state.content_slots()
        if bool((content != content[:, :1]).any()):
            raise ConfigError(
                "selector 'adjacent_pairs' merges the same pairs in every KV head of a layer and needs the same number "
                f"of content slots in every head of a row; got per-head content {content.tolist()}"
            )
        if bool((budgets != budgets[:, :1]).any()):
            raise ConfigError(
                "selector 'adjacent_pairs' keeps one budget per row, shared by the layer's KV heads; got per-head budgets "
                f"{budgets.tolist()}; use a schedule that gives every head of a layer the same budget (uniform, pyramid)"
            )
        n = content[:, 0]
        k_merge = (n - budgets[:, 0].clamp(max=n)).clamp(min=0)
        n_pairs = (n - self.n_sink - 1).clamp(min=0)
        over = k_merge > n_pairs
        if bool(over.any()):
            row = int(over.nonzero()[0, 0])
            nr, pr = int(n[row]), int(n_pairs[row])
            raise ConfigError(
                f"selector 'adjacent_pairs': budget {int(budgets[row, 0])} is too small for row {row} ({nr} content slots, "
                f"n_sink={self.n_sink}): only {pr} adjacent middle pairs can be merged; minimum budget {nr - pr}"
            )
        pair, ok, slot = self.pair_scores(scores, state)
        order = pair.argsort(dim=-1, stable=True)  # ascending score, ties: older pair first
        if self.overlap == "parity":
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(t - 1, device=order.device).expand_as(order).contiguous())
            chosen = ok & (rank < k_merge[:, None])
        else:
            chosen = self._disjoint(order, k_merge, n, n_pairs, budgets, ok)
        return self._selection(chosen, n, slot, t, h)

    def _disjoint(self, order: Tensor, k_merge: Tensor, n: Tensor, n_pairs: Tensor, budgets: Tensor, ok: Tensor) -> Tensor:
        """Greedy lowest-score non-overlapping pairs, per row (a short CPU loop over sorted pairs)."""
        chosen = torch.zeros_like(ok)
        for row in range(order.shape[0]):
            k = int(k_merge[row])
            if k == 0:
                continue
            used = bytearray(order.shape[1] + 2)
            picked: list[int] = []
            for p in order[row, : int(n_pairs[row])].tolist():
                if used[p] or used[p + 1]:
                    continue
                used[p] = used[p + 1] = 1
                picked.append(p)
                if len(picked) == k:
                    break
            if len(picked) < k:
                nr, pr = int(n[row]), int(n_pairs[row])
                raise ConfigError(
                    f"selector 'adjacent_pairs' with overlap='disjoint': budget {int(budgets[row, 0])} needs {k} merges in row "
                    f"{row} ({nr} content slots, n_sink={self.n_sink}) but the greedy lowest-score disjoint pairing finds only "
                    f"{len(picked)}; minimum budget here {nr - len(picked)} (any budget >= {nr - math.ceil(pr / 3)} always "
                    "works), or use overlap: parity"
                )
            chosen[row, torch.tensor(picked, dtype=torch.long, device=ok.device)] = True
        return chosen

    @staticmethod
    def _selection(chosen: Tensor, n: Tensor, slot: Tensor, t: int, h: int) -> Selection:
        """Apply the picks simultaneously (``overlap`` rule above) in valid-rank space, then map to slots."""
        b = chosen.shape[0]
        dev = chosen.device
        ar = torch.arange(t, device=dev)
        rank_ok = ar[None, :] < n[:, None]
        deleted = torch.zeros(b, t, dtype=torch.bool, device=dev)
        deleted[:, 1:] = chosen  # the right slot of every picked pair goes away
        keep_r = rank_ok & ~deleted
        kidx = torch.cumsum(keep_r.long(), dim=-1) - 1
        assign_r = torch.where(keep_r, kidx, -1)
        absorbs = chosen & keep_r[:, :-1]  # left slot survives: the right one folds into it
        assign_r[:, 1:] = torch.where(absorbs, kidx[:, :-1], assign_r[:, 1:])  # else lost (overlap)
        s = max(int(keep_r.sum(-1).max()), 1) if b else 1
        kept_rank = true_slots_first(keep_r)[:, :s]
        keep_valid_r = kept_rank < t
        kept_rank = torch.where(keep_valid_r, kept_rank, 0)
        keep = slot.gather(-1, kept_rank[:, None, :].expand(b, h, s))
        keep_valid = keep_valid_r[:, None, :].expand(b, h, s).clone()
        keep = torch.where(keep_valid, keep, 0)
        assign = torch.full((b, h, t), -1, dtype=torch.long, device=dev)
        src = torch.where(rank_ok, assign_r, -1)[:, None, :].expand(b, h, t)
        assign.scatter_(-1, slot, src)
        return Selection(keep=keep, keep_valid=keep_valid, assign=assign)
