"""The slot state of one cache layer, as plain tensors.

A compressed cache is a cache of *slots*. Per batch row and KV head a slot holds a key, a value,
the original position of its token (or of the last token merged into it), a log-weight (``0`` for
a plain token, ``ln l`` for a slot standing for ``l`` merged tokens) and optional per-slot
statistics. Slots that hold no content (left padding, or the unused tail of a head that keeps fewer
slots than its neighbours) are marked invalid and are never attended to or counted in a budget.

:class:`SlotState` is the unit every policy works on; it carries no model and no cache object, so a
compressor is a pure function of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

#: Position stored for slots that hold no content.
INVALID_POSITION = -1


@dataclass
class SlotState:
    """Slots of one layer.

    Attributes
    ----------
    keys, values:
        ``[B, H, T, D]`` as stored by the cache: keys are rotated (RoPE) at ``positions``.
    positions:
        ``[B, H, T]`` int64 position of each slot; :data:`INVALID_POSITION` where ``valid`` is false.
    log_weights:
        ``[B, H, T]`` float32 additive attention-logit bias of each slot (``ln`` of its count).
    valid:
        ``[B, H, T]`` bool, true for slots that hold content.
    stats:
        Per-slot statistics a method keeps, each ``[B, H, T]`` or ``[B, H, T, D]`` (float: e.g.
        accumulated attention, age, a gradient or a Hessian proxy); they follow the slots through
        every compression (gather, concatenation, batch reordering).
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    log_weights: Tensor
    valid: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_tensors(
        cls,
        keys: Tensor,
        values: Tensor,
        positions: Tensor | None = None,
        log_weights: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> SlotState:
        """Wrap plain ``[B, H, T, D]`` keys and values as slots (positions ``0..T-1`` by default)."""
        if keys.dim() != 4 or values.dim() != 4:
            raise ValueError(
                f"keys and values must be 4-D [batch, kv_heads, tokens, head_dim]; got shapes "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree in batch, heads or tokens"
            )
        b, h, t, _ = keys.shape
        dev = keys.device
        if positions is None:
            positions = torch.arange(t, device=dev).expand(b, h, t).clone()
        elif positions.dim() == 1:
            positions = positions.to(dev).expand(b, h, t).clone()
        elif positions.dim() == 2:
            positions = positions.to(dev)[:, None, :].expand(b, h, t).clone()
        if valid is None:
            valid = torch.ones(b, h, t, dtype=torch.bool, device=dev)
        elif valid.dim() == 2:
            valid = valid.to(dev)[:, None, :].expand(b, h, t).clone()
        if log_weights is None:
            log_weights = torch.zeros(b, h, t, dtype=torch.float32, device=dev)
        positions = torch.where(valid, positions.long(), INVALID_POSITION)
        return cls(keys, values, positions, log_weights.float(), valid.bool())

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_slots(self) -> int:
        """Allocated slots per head (content and padding)."""
        return self.keys.shape[2]

    def content_slots(self) -> Tensor:
        """``[B, H]`` number of slots that hold content."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        """Bytes actually held by this state's tensors (keys, values, positions, weights, stats)."""
        tensors = [self.keys, self.values, self.positions, self.log_weights, self.valid, *self.stats.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def gather(self, index: Tensor, index_valid: Tensor) -> SlotState:
        """Slots at ``index`` ``[B, H, S]``; entries with ``index_valid`` false become invalid padding."""
        idx = index.clamp(min=0)
        idx4 = idx[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        valid = index_valid & self.valid.gather(2, idx)
        return SlotState(
            keys=self.keys.gather(2, idx4),
            values=self.values.gather(2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1])),
            positions=torch.where(valid, self.positions.gather(2, idx), INVALID_POSITION),
            log_weights=torch.where(valid, self.log_weights.gather(2, idx), 0.0),
            valid=valid,
            stats={k: _gather_stat(v, idx) for k, v in self.stats.items()},
        )

    def keep(self, mask: Tensor) -> SlotState:
        """The slots where ``mask`` ``[B, H, T]`` is true, in slot order, each head padded to the
        longest (a window trim; selectors build :class:`~kvframe.policies.base.Selection` instead)."""
        t = mask.shape[-1]
        s = max(int(mask.sum(-1).max()), 1) if mask.numel() else 1
        order = true_slots_first(mask)[..., :s]
        ok = order < t
        return self.gather(torch.where(ok, order, 0), ok)

    def cat(self, other: SlotState) -> SlotState:
        """Append ``other``'s slots after this state's (same batch, heads and head size)."""
        stats = {}
        for k in set(self.stats) | set(other.stats):
            ref = self.stats.get(k, other.stats.get(k))
            a = self.stats.get(k)
            b = other.stats.get(k)
            if a is None:
                a = ref.new_zeros(*self.log_weights.shape, *ref.shape[3:])
            if b is None:
                b = ref.new_zeros(*other.log_weights.shape, *ref.shape[3:])
            stats[k] = torch.cat([a, b], dim=2)
        return SlotState(
            keys=torch.cat([self.keys, other.keys], dim=2),
            values=torch.cat([self.values, other.values], dim=2),
            positions=torch.cat([self.positions, other.positions], dim=2),
            log_weights=torch.cat([self.log_weights, other.log_weights], dim=2),
            valid=torch.cat([self.valid, other.valid], dim=2),
            stats=stats,
        )

    def index_batch(self, index: Tensor) -> SlotState:
        """Rows ``index`` of the batch (beam reordering, batch selection)."""
        return SlotState(
            keys=self.keys[index],
            values=self.values[index],
            positions=self.positions[index],
            log_weights=self.log_weights[index],
            valid=self.valid[index],
            stats={k: v[index] for k, v in self.stats.items()},
        )

    def replace(self, **changes) -> SlotState:
        return replace(self, **changes)

    def with_stats(self, **stats: Tensor) -> SlotState:
        """A copy whose stats dict has ``stats`` added or replaced (the tensors are shared)."""
        return replace(self, stats={**self.stats, **stats})

    def slice(self, n: int) -> SlotState:
        """The first ``n`` slots of every head."""
        return SlotState(
            keys=self.keys[:, :, :n],
            values=self.values[:, :, :n],
            positions=self.positions[:, :, :n],
            log_weights=self.log_weights[:, :, :n],
            valid=self.valid[:, :, :n],
            stats={k: v[:, :, :n] for k, v in self.stats.items()},
        )


def _gather_stat(stat: Tensor, idx: Tensor) -> Tensor:
    """Gather ``[B, H, T, *]`` along slots with ``idx`` ``[B, H, S]``."""
    if stat.dim() == 3:
        return stat.gather(2, idx)
    extra = stat.shape[3:]
    full = idx.reshape(*idx.shape, *([1] * len(extra))).expand(*idx.shape, *extra)
    return stat.gather(2, full)


def position_order(valid: Tensor, positions: Tensor) -> Tensor:
    """``[B, H, T]`` slot indices of each head sorted by position, valid slots first (stable).

    Slots are not always stored in position order: an in-place eviction during decoding moves the
    newest slots into the evicted ones' places (``docs/architecture.md``, "In-place eviction").
    Code that reasons about "older" and "newer" slots goes through this order, never through slot
    indices."""
    big = torch.iinfo(torch.long).max
    return torch.where(valid, positions.long(), big).argsort(dim=-1, stable=True)


def position_rank(valid: Tensor, positions: Tensor) -> Tensor:
    """``[B, H, T]`` rank of every slot by position among the valid slots of its head (0 for the
    oldest content token, wherever it is stored); invalid slots rank after the valid ones."""
    order = position_order(valid, positions)
    ar = torch.arange(valid.shape[-1], device=valid.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def true_slots_first(mask: Tensor) -> Tensor:
    """``[..., T]`` the slot indices where ``mask`` is true, ascending, then the other indices
    ascending, stored as ``index + T`` (so ``< T`` tells the two apart).

    The layout every selector builds its result from: kept (or valid) slots first in position
    order, padding after, without a data-dependent size."""
    t = mask.shape[-1]
    ar = torch.arange(t, device=mask.device)
    return torch.where(mask, ar, ar + t).sort(dim=-1).values


@dataclass
class Eviction:
    """An in-place compression of one layer: what changes, not the whole result.

    A decode-time compressor that drops a few slots per step returns this instead of a new
    :class:`SlotState` (``docs/architecture.md``, "In-place eviction"): the store overwrites the
    ``evict`` slots' validity and writes the ``targets`` (the kept slots a merge changed, or that a
    merge read) with ``updated``, so a step moves O(evicted + targets) slots, never the layer.

    Attributes
    ----------
    evict, evict_valid:
        ``[B, H, E]`` slot indices that stop holding content (``evict_valid`` false: padding).
    targets, targets_valid:
        ``[B, H, U]`` slot indices of kept slots whose contents are rewritten.
    updated:
        ``[B, H, U]`` slots: the new keys, values, positions, log-weights and statistics of
        ``targets`` (entries with ``targets_valid`` false are ignored).
    stats:
        The layer's per-slot statistics after the firing's ``observe`` calls (``[B, H, T, ...]``
        each), which the store takes over (evicted entries zeroed, targets' entries updated).
    changed:
        The fields of ``updated`` the store writes over the targets (``keys``, ``values``,
        ``positions``, ``log_weights``, ``stats.<name>``); the others are the targets' own.
    """

    evict: Tensor
    evict_valid: Tensor
    targets: Tensor
    targets_valid: Tensor
    updated: SlotState
    stats: dict[str, Tensor] = field(default_factory=dict)
    changed: tuple[str, ...] = ("keys", "values", "positions", "log_weights")
