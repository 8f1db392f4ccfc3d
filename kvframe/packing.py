"""The packed layout of a slot store: ragged heads without padding.

After a compression that leaves heads of one layer with different numbers of slots (head-adaptive
budgets, per-head schedules, rows of a left-padded batch), a dense ``[B, H, S, D]`` buffer pads every
head to the longest. The packed layout instead holds every (row, KV head) *segment* one after the
other in flat buffers ``[N, ...]`` (one per part: the codec's key and value parts, positions,
log-weights, validity), as var-len attention does:

- ``start [B, H]``: the flat index of a head's first slot;
- ``prefix [B, H]``: the slots installed by the last compression (its dense slots ``0..prefix-1``:
  content, and any padding *between* content slots; the padding after a head's last content slot is
  not stored);
- ``tail``: slots appended since (decoding steps, question tokens), the same number for every head,
  stored right after the head's prefix;
- ``cap [B, H]``: the segment's capacity (``prefix + tail`` plus free room for appends).

Bytes held are therefore the content slots' (plus free room that :meth:`SlotStore.memory
<kvframe.store.SlotStore>` reports apart), not ``B * H * max(slots)``.

**The dense view is unchanged.** :meth:`PackedLayout.view_index` maps the ``[B, H, n]`` view every
policy works on (``n = base + tail``, ``base`` the dense length at installation) onto the flat
buffers: view slot ``i`` of a head is its segment's slot ``i`` for ``i < prefix``, padding for
``prefix <= i < base``, and segment slot ``prefix + i - base`` for ``i >= base``. That is exactly
the slot layout the dense store would hold, so policies, statistics and the eviction indices of a
firing see the same states in both layouts. Padding view slots read one extra zero entry at flat
index ``N`` (invalid, position -1, log-weight 0, zero keys and values), so a view never reads free
room. The view is materialised for the duration of one layer pass and released after it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kvframe.slots import INVALID_POSITION

#: A segment that must grow gets ``max(headroom, GROWTH x its slots, MIN_GROWTH)`` free slots.
GROWTH = 0.25
MIN_GROWTH = 16


@dataclass(frozen=True)
class PackedLayout:
    """Where each head's slots live in the flat buffers (see the module docstring)."""

    start: Tensor
    prefix: Tensor
    cap: Tensor
    base: int
    tail: int
    size: int  # N: flat entries of the segments; entry N is the zero slot
    free: int  # the least free room of any segment (host int: appends need no sync)

    @property
    def n(self) -> int:
        """Slots per head of the dense view."""
        return self.base + self.tail

    @property
    def used(self) -> Tensor:
        """``[B, H]`` slots each segment holds."""
        return self.prefix + self.tail

    @property
    def batch_heads(self) -> tuple[int, int]:
        return int(self.start.shape[0]), int(self.start.shape[1])

    def view_index(self) -> Tensor:
        """``[B, H, n]`` flat index of every dense view slot (``size``: the zero slot)."""
        i = torch.arange(self.n, device=self.start.device)
        start, prefix = self.start[..., None], self.prefix[..., None]
        idx = torch.where(i >= self.base, start + prefix + (i - self.base), start + i)
        return torch.where((i < prefix) | (i >= self.base), idx, self.size)

    def segment_index(self, first: int, count: int) -> Tensor:
        """``[B, H, count]`` flat index of segment slots ``prefix + first .. prefix + first + count - 1``."""
        return self.start[..., None] + self.prefix[..., None] + first + torch.arange(count, device=self.start.device)

    def held(self) -> tuple[Tensor, Tensor]:
        """``[B, H, m]`` flat index of each segment's held slots (``m`` the most any holds) and
        whether each entry is held (entries past a segment's slots are false)."""
        m = int(self.used.max()) if self.used.numel() else 0
        ar = torch.arange(m, device=self.start.device)
        return self.start[..., None] + ar, ar < self.used[..., None]

    def appended(self, q: int) -> PackedLayout:
        return replace(self, tail=self.tail + q, free=self.free - q)


def layout_for(seg: Tensor, base: int, extra: Tensor | int) -> PackedLayout:
    """A fresh layout for segments of ``seg [B, H]`` slots, each with ``extra`` free slots."""
    cap = seg + extra
    flat = cap.flatten()
    start = (flat.cumsum(0) - flat).view_as(cap)
    size = int(flat.sum())
    free = int((cap - seg).min()) if cap.numel() else 0
    return PackedLayout(start=start, prefix=seg, cap=cap, base=base, tail=0, size=size, free=free)


def segment_lengths(valid: Tensor) -> Tensor:
    """``[B, H]`` the dense slots a head must keep: up to and including its last valid slot."""
    ar = torch.arange(1, valid.shape[-1] + 1, device=valid.device)
    return torch.where(valid, ar, 0).amax(-1) if valid.shape[-1] else valid.new_zeros(valid.shape[:2], dtype=torch.long)


def growth(used: Tensor, headroom: int) -> Tensor:
    """Free slots a growing segment of ``used`` slots gets."""
    if headroom:
        return torch.full_like(used, headroom)
    return torch.clamp(torch.ceil(used.float() * GROWTH).long(), min=MIN_GROWTH)


def empty_value(name: str) -> float | int | bool:
    """What the zero slot (a padding view slot) holds in part ``name``."""
    return {"positions": INVALID_POSITION, "valid": False}.get(name, 0)


def _flat(name: str, like: Tensor, size: int, trailing: tuple[int, ...]) -> Tensor:
    """A flat buffer ``[size + 1, *trailing]`` for part ``name``: free room uninitialised (``valid``:
    false), entry ``size`` the zero slot."""
    new = (torch.zeros if name == "valid" else torch.empty)((size + 1, *trailing), dtype=like.dtype, device=like.device)
    new[size] = empty_value(name)
    return new


def pack(dense: dict[str, Tensor], layout: PackedLayout) -> dict[str, Tensor]:
    """Flat buffers ``[N + 1, ...]`` holding the first ``layout.prefix`` slots of every head of the
    dense ``[B, H, S, ...]`` parts; free room is uninitialised except ``valid`` (false), and entry
    ``N`` is the zero slot."""
    any_t = next(iter(dense.values()))
    s = any_t.shape[2]
    keep = torch.arange(s, device=any_t.device) < layout.prefix[..., None]  # [B, H, S]
    dst = (layout.start[..., None] + torch.arange(s, device=any_t.device))[keep]
    out = {}
    for k, t in dense.items():
        out[k] = _flat(k, t, layout.size, tuple(t.shape[3:]))
        out[k][dst] = t[keep]
    return out


def repack(flat: dict[str, Tensor], old: PackedLayout, new: PackedLayout) -> dict[str, Tensor]:
    """Move every segment's held slots into ``new`` (same prefixes and tail, larger capacities)."""
    idx, keep = old.held()
    src = idx[keep]
    dst = (idx - old.start[..., None] + new.start[..., None])[keep]
    out = {}
    for k, t in flat.items():
        out[k] = _flat(k, t, new.size, tuple(t.shape[1:]))
        out[k][dst] = t[src]
    return out


def padding_fraction(valid: Tensor, num_slots: int) -> float:
    """Padding slots of a dense state (after each head's last content slot) over its content."""
    b, h = valid.shape[:2]
    seg = segment_lengths(valid)
    content = max(int(seg.sum()), 1)
    return (b * h * num_slots - content) / content

