"""The slot store of one cache layer: preallocated capacity, appends written in place.

A :class:`SlotStore` holds a layer's slots in buffers whose slot axis (dim 2) has a *capacity*
of at least the slots held. What policies and attention see is :meth:`SlotStore.view`, a
:class:`~kvframe.slots.SlotState` whose tensors are views of the first ``n`` slots of the buffers
(no copy), exactly the dense ``[B, H, n, D]`` state every policy already works on.

- **Appending** (``SlotLayer.update``) writes the new slots into the free capacity in place. When the
  capacity is short the buffers grow geometrically (by a quarter, at least 64 slots), so appends are
  amortised O(1) per slot instead of a copy of the whole layer per decoding step.
- **Headroom**: a compressor whose trigger holds the cache at a capacity (decode-time eviction:
  ``every`` slots; chunked prefill: one chunk) gets buffers of ``kept + headroom`` slots after each
  compression, so the appends until the next firing fit and the compressed result is copied back
  into the same buffers: no allocation per step.
- **Installing** a compressed (or re-ordered) state copies it into the buffers when they are
  owned and their capacity fits ``kept + headroom`` within 2% (a decode-time method's steady state);
  otherwise it takes new buffers sized ``kept + headroom``, adopting the compressor's freshly
  gathered tensors when no headroom is needed, so memory is really released after compression.
- **Forks** share the buffers copy-on-write: :meth:`fork` marks both stores shared, and whichever
  writes first (an append, an installation) copies the buffers first. The views a fork hands out
  are never written through by kvframe once their pass is over (``docs/architecture.md``, "Forks").
- **Packed heads**: an installed state whose heads hold different numbers of slots (head-adaptive
  budgets, per-head schedules, rows of a left-padded batch) is stored packed, each head's slots one
  after the other in flat buffers (:mod:`kvframe.packing`), so the bytes held are the content
  slots', not ``B x H x`` the longest head's. The dense view policies see is the same in both
  layouts; for a packed store it is materialised for one layer pass (:meth:`view`) and released
  after it (:meth:`release_view`). Appends write into each segment's free room in place; an
  in-place eviction, a re-index rewrite or a truncation first returns the store to the dense
  layout (decode-time evictions drop the same number of slots from every head).
- **Codec**: keys and values are held through a :class:`~kvframe.codecs.Codec` (``fp``, the model's
  dtype, by default); the store moves the codec's parts slot by slot without knowing what they
  hold (``docs/architecture.md``, "The slot store").

Per-slot statistics stay dense ``[B, H, n, ...]`` tensors next to the buffers: policies replace
them (never write into them), and they are small next to keys and values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kvframe import packing
from kvframe.codecs import Codec, FpCodec
from kvframe.packing import PackedLayout
from kvframe.slots import INVALID_POSITION, Eviction, SlotState

#: Buffers grow by this fraction of their capacity (at least :data:`MIN_GROWTH` slots).
GROWTH = 0.25
MIN_GROWTH = 64
#: An installed state is copied into the current buffers if their capacity exceeds what it needs
#: (kept slots + headroom) by at most this fraction of the kept slots (else new buffers are taken).
FIT_TOLERANCE = 0.02
#: An installed state whose heads would hold more padding than this fraction of their content
#: slots is stored packed (:mod:`kvframe.packing`), unless the store was made with ``pack=False``.
PACK_TOLERANCE = 0.02

_META = ("positions", "log_weights", "valid")


def _owns_storage(t: Tensor) -> bool:
    """Whether ``t`` is the whole of its storage (adopting it holds no hidden bytes); a permuted
    layout (a transposed projection's keys) is fine: growth copies into dense buffers."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


class SlotStore:
    """The slots of one layer (see the module docstring).

    Attributes
    ----------
    n:
        Slots held per row and head (the view's length).
    headroom:
        Free slots kept after each installation (the trigger's appends between firings).
    allocations:
        How many times buffers were allocated (first append, growth, copy-on-write, resizing).
    copied_slots:
        Slots (per row and head) copied between buffers by growth, copy-on-write and installation;
        appends in place and views copy none.
    """

    def __init__(self, codec: Codec | None = None, headroom: int = 0, pack: bool = True):
        self.codec = codec or FpCodec()
        self.headroom = int(headroom)
        self.pack = pack
        self.layout: PackedLayout | None = None  # set while the slots are stored packed
        self.version = 0  # bumped by every change of the held slots or statistics
        self.parts: dict[str, Tensor] = {}
        self.stats: dict[str, Tensor] = {}
        self.n = 0
        self.shared = False
        self.allocations = 0
        self.copied_slots = 0
        self._view: SlotState | None = None

    # -- reading ------------------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        return self.layout is not None

    @property
    def capacity(self) -> int:
        """Slots per head the view can reach before a buffer must grow (packed: the fullest segment's)."""
        if self.layout is not None:
            return self.n + self.layout.free
        return self.parts["valid"].shape[2] if self.parts else 0

    @property
    def batch_heads(self) -> tuple[int, int]:
        if self.layout is not None:
            return self.layout.batch_heads
        b, h = self.parts["valid"].shape[:2]
        return int(b), int(h)

    def view(self) -> SlotState | None:
        """The held slots as a dense :class:`SlotState` (the same object until the store changes):
        views of the buffers, or for a packed store a gather of them (:meth:`release_view`)."""
        if not self.parts:
            return None
        if self._view is None:
            n = self.n
            if self.layout is None:
                p = {k: v[:, :, :n] for k, v in self.parts.items()}
            else:
                idx = self.layout.view_index()
                p = {k: v[idx] for k, v in self.parts.items()}
            self._view = SlotState(
                keys=self.decode("keys", p),
                values=self.decode("values", p),
                positions=p["positions"],
                log_weights=p["log_weights"],
                valid=p["valid"],
                stats=self.stats,
            )
        return self._view

    def release_view(self) -> None:
        """Drop a packed store's materialised view (the end of a layer pass); a dense store's view
        is views of its buffers and costs nothing to keep."""
        if self.layout is not None:
            self._view = None

    def nbytes(self) -> int:
        """Bytes allocated: every buffer at its capacity, the statistics and the packed layout."""
        tensors = [*self.parts.values(), *self.stats.values()]
        if self.layout is not None:
            tensors += [self.layout.start, self.layout.prefix, self.layout.cap]
        return sum(t.numel() * t.element_size() for t in tensors)

    def slot_count(self) -> int:
        """Slots held, content and padding, summed over rows and heads."""
        if not self.parts:
            return 0
        if self.layout is not None:
            return int(self.layout.used.sum())
        b, h = self.batch_heads
        return b * h * self.n

    def content_count(self) -> int:
        """Content slots held, summed over rows and heads."""
        if not self.parts:
            return 0
        if self.layout is not None:
            return int(self.parts["valid"].sum())  # free room and the zero slot are never valid
        return int(self.parts["valid"][:, :, : self.n].sum())

    def _slot_bytes(self, kv_only: bool) -> int:
        """Bytes of one slot of one head, summed over the parts (keys and values only if ``kv_only``)."""
        lead = 1 if self.layout is not None else 3
        return sum(
            math.prod(t.shape[lead:]) * t.element_size()
            for k, t in self.parts.items()
            if not kv_only or k.startswith(("keys.", "values."))
        )

    def kv_bytes(self, slots: int | None = None) -> int:
        """Key and value bytes of the slots held (content and padding), or of ``slots`` slots per
        row and head."""
        if not self.parts:
            return 0
        if slots is None:
            return self.slot_count() * self._slot_bytes(True)
        b, h = self.batch_heads
        return b * h * slots * self._slot_bytes(True)

    def reserved_bytes(self) -> int:
        """Bytes of allocated capacity beyond the slots held (every buffer; packed: the free room
        of every segment)."""
        if not self.parts:
            return 0
        if self.layout is not None:
            free = self.layout.size - int(self.layout.used.sum())
        else:
            b, h = self.batch_heads
            free = b * h * (self.capacity - self.n)
        return free * self._slot_bytes(False)

    # -- writing ------------------------------------------------------------------------------
    def _encode(self, st: SlotState) -> dict[str, Tensor]:
        out = {f"keys.{k}": v for k, v in self.codec.parts(st.keys).items()}
        out.update({f"values.{k}": v for k, v in self.codec.parts(st.values).items()})
        out.update(positions=st.positions, log_weights=st.log_weights, valid=st.valid)
        return out

    def _allocate(self, like: dict[str, Tensor], capacity: int, keep: int) -> None:
        """New buffers shaped like ``like`` (batch, heads, trailing dims) with ``capacity`` slots;
        the first ``keep`` slots of the current buffers are copied over."""
        new = {k: t.new_empty((*t.shape[:2], capacity, *t.shape[3:])) for k, t in like.items()}
        if keep:
            for k, t in new.items():
                t[:, :, :keep].copy_(self.parts[k][:, :, :keep])
            self.copied_slots += keep
        self.parts = new
        self.shared = False
        self.allocations += 1

    def append(self, new: SlotState, want_view: bool = True, meta_later: bool = False) -> SlotState | None:
        """Append ``new``'s slots after the held ones (in place when capacity allows); new slots get
        zero statistics. Returns the new view if ``want_view`` (``None`` for a packed store: its
        view is a gather, made only when a pass needs it). ``meta_later``: the caller writes the new
        slots' positions and validity itself (:meth:`write_tail`) before anything reads them, so
        they are not copied here (a layer pass: the attention function knows them)."""
        enc = self._encode(new)
        skip = ("positions", "valid") if meta_later and self.parts else ()
        q = new.num_slots
        need = self.n + q
        self.version += 1
        if self.layout is not None:
            self._append_packed({k: t for k, t in enc.items() if k not in skip}, q)
        elif not self.parts:
            if self.headroom == 0 and all(_owns_storage(t) for t in enc.values()):
                # the first pass: adopt its keys and values as they are; the small per-slot fields
                # are copied (the caller may reuse them, e.g. the layer's constant placeholders)
                self.parts = {k: t if k.startswith(("keys.", "values.")) else t.clone() for k, t in enc.items()}
                self.shared = False
                self.allocations += 1
            else:
                self._allocate(enc, need + self.headroom, 0)
                for k, t in enc.items():
                    self.parts[k][:, :, :q].copy_(t)
        else:
            if self.shared or need > self.capacity:
                cap = self.capacity
                if need > cap:
                    cap = need + self.headroom if self.headroom else max(need, cap + max(math.ceil(cap * GROWTH), MIN_GROWTH))
                self._allocate(self.parts, cap, self.n)
            for k, t in enc.items():
                if k not in skip:
                    self.parts[k][:, :, self.n : need].copy_(t)
        b, h = new.batch_size, new.num_heads
        self.stats = {k: torch.cat([v, v.new_zeros(b, h, q, *v.shape[3:])], dim=2) for k, v in self.stats.items()}
        self.n = need
        self._view = None
        return self.view() if want_view and self.layout is None else None

    def kv(self) -> tuple[Tensor, Tensor] | None:
        """A dense store's held keys and values ``[B, H, n, D]`` (views of the buffers, no
        :class:`SlotState` built); ``None`` for a packed or empty store."""
        if self.layout is not None or not self.parts:
            return None
        n = self.n
        return self.decode("keys", select=lambda v: v[:, :, :n]), self.decode("values", select=lambda v: v[:, :, :n])

    def decode(self, field: str, parts: dict[str, Tensor] | None = None, select: Any = None) -> Tensor:
        """The ``keys`` or ``values`` the codec decodes from ``parts`` (default: the buffers),
        each part passed through ``select`` first (a slice or an index)."""
        prefix = f"{field}."
        src = self.parts if parts is None else parts
        return self.codec.decode(
            {k[len(prefix):]: (v if select is None else select(v)) for k, v in src.items() if k.startswith(prefix)}
        )

    def _append_packed(self, enc: dict[str, Tensor], q: int) -> None:
        """Write ``q`` new slots per head after each segment's held ones; segments short of room
        grow (all at once, by :func:`kvframe.packing.growth`)."""
        self._own()
        lay = self.layout
        assert lay is not None
        if q > lay.free:
            need = lay.used + q
            fresh = packing.layout_for(need, lay.base, packing.growth(need, self.headroom))
            grown = PackedLayout(fresh.start, lay.prefix, fresh.cap, lay.base, lay.tail, fresh.size, fresh.free + q)
            self.parts = packing.repack(self.parts, lay, grown)
            self.allocations += 1
            self.copied_slots += int(lay.used.max())
            lay = grown
        idx = lay.segment_index(lay.tail, q)
        for k, t in enc.items():
            self.parts[k][idx] = t.to(self.parts[k].dtype)
        self.layout = lay.appended(q)

    def write_tail(self, q: int, positions: Tensor | None = None, valid: Tensor | None = None, keys: Tensor | None = None) -> None:
        """Overwrite fields of the last ``q`` appended slots of every head (``[B, H, q, ...]``), in
        place: their positions and validity once the attention function knows them, re-rotated keys
        in re-index mode."""
        pairs: list[tuple[str, Tensor]] = []
        if keys is not None:
            pairs += [(f"keys.{k}", t) for k, t in self.codec.parts(keys).items()]
        pairs += [(k, t) for k, t in (("positions", positions), ("valid", valid)) if t is not None]
        if self.layout is None:
            for k, t in pairs:
                self.parts[k][:, :, self.n - q : self.n].copy_(t)
        else:
            idx = self.layout.segment_index(self.layout.tail - q, q)
            for k, t in pairs:
                self.parts[k][idx] = t.to(self.parts[k].dtype)
            self._view = None
        self.version += 1

    def tail_keys(self, q: int) -> Tensor:
        """The keys ``[B, H, q, D]`` of the last ``q`` appended slots of every head."""
        if self.layout is None:
            view = self.view()
            assert view is not None
            return view.keys[:, :, -q:]
        idx = self.layout.segment_index(self.layout.tail - q, q)
        return self.decode("keys", select=lambda v: v[idx])

    def packed_slots(self) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """A packed store's flat parts (``[N + 1, ...]``; keys and values still encoded by the
        codec), each head's first flat index ``[B, H]`` and its slots held ``[B, H]`` (prefix and
        appended slots, contiguous: the dense view's padding between them is not stored)."""
        assert self.layout is not None, "packed_slots() of a dense store"
        return self.parts, self.layout.start, self.layout.used

    def install(self, state: SlotState | None) -> None:
        """Make ``state`` the held slots (a compressed, trimmed or re-ordered state, or new stats).

        Tensors that are the current view's own are kept as they are; otherwise the state is copied
        into the buffers if they fit (see the module docstring) or becomes new buffers."""
        if state is None:
            self.parts, self.stats, self.n, self._view, self.shared, self.layout = {}, {}, 0, None, False, None
            self.version += 1
            return
        cur = self._view if self._view is not None else self.view()
        if cur is not None and all(getattr(state, f) is getattr(cur, f) for f in ("keys", "values", *_META)):
            if state.stats is not cur.stats:  # only statistics changed
                self.stats = dict(state.stats)
                self._view = None if self.layout is None else cur.replace(stats=self.stats)
                self.version += 1
            return
        self.version += 1
        enc = self._encode(state)
        m = state.num_slots
        b, h = state.batch_size, state.num_heads
        if self.pack and b * h > 1 and m > 0 and packing.padding_fraction(state.valid, m) > PACK_TOLERANCE:
            lay = packing.layout_for(packing.segment_lengths(state.valid), m, self.headroom)
            self.parts, self.layout, self.shared = packing.pack(enc, lay), lay, False
            self.allocations += 1
            self.copied_slots += m
            self.stats = dict(state.stats)
            self.n = m
            self._view = None
            return
        if self.layout is not None:  # back to the dense layout: new buffers
            self.parts, self.layout = {}, None
        target = m + self.headroom
        same_shape = bool(self.parts) and all(
            k in self.parts and self.parts[k].shape[:2] == t.shape[:2] and self.parts[k].shape[3:] == t.shape[3:]
            for k, t in enc.items()
        ) and len(enc) == len(self.parts)
        fits = same_shape and not self.shared and target <= self.capacity <= target + math.ceil(FIT_TOLERANCE * m)
        if fits:
            storages = {t.untyped_storage().data_ptr() for t in self.parts.values()}
            for k, t in enc.items():
                field = k.split(".", 1)[0]
                if cur is not None and getattr(state, field) is getattr(cur, field):
                    continue  # unchanged: the held slots' own view
                if t.untyped_storage().data_ptr() in storages:
                    t = t.clone()  # a view into the buffers themselves: copy it out first
                self.parts[k][:, :, :m].copy_(t)
            self.copied_slots += m
        elif self.headroom == 0 and all(_owns_storage(t) for t in enc.values()):
            self.parts, self.shared = dict(enc), False
            self.allocations += 1
        else:
            new = {k: t.new_empty((*t.shape[:2], target, *t.shape[3:])) for k, t in enc.items()}
            for k, t in enc.items():
                new[k][:, :, :m].copy_(t)
            self.parts, self.shared = new, False
            self.allocations += 1
            self.copied_slots += m
        self.stats = dict(state.stats)
        self.n = m
        self._view = None

    def _own(self) -> None:
        """Copy shared buffers before writing into them (copy-on-write)."""
        if self.shared and self.layout is not None:
            self.parts = {k: v.clone() for k, v in self.parts.items()}
            self.shared = False
            self.allocations += 1
            self.copied_slots += self.n
        elif self.shared:
            self._allocate(self.parts, self.capacity, self.n)

    def unpack(self) -> None:
        """Return a packed store to the dense layout (``n + headroom`` slots per head); the view,
        and so every slot index a policy computed on it, stays the same."""
        if self.layout is None:
            return
        idx = self.layout.view_index()
        dense = {k: v[idx] for k, v in self.parts.items()}
        self.layout = None
        if self.headroom:
            self.parts = {}
            self._allocate(dense, self.n + self.headroom, 0)
            for k, t in dense.items():
                self.parts[k][:, :, : self.n].copy_(t)
        else:
            self.parts, self.shared = dense, False
            self.allocations += 1
        self.copied_slots += self.n
        self._view = None

    @staticmethod
    def _slot_index(index: Tensor, t: Tensor) -> Tensor:
        """``index`` ``[B, H, U]`` expanded over ``t``'s trailing dims (for gather/scatter on dim 2)."""
        return index.reshape(*index.shape, *([1] * (t.dim() - 3))).expand(*index.shape, *t.shape[3:])

    @staticmethod
    def _scatter(t: Tensor, index: Tensor, src: Tensor) -> None:
        """``t[b, h, index[b, h, j]] = src[b, h, j]`` along the slot axis, in place."""
        t.scatter_(2, SlotStore._slot_index(index, t), src.to(t.dtype))

    @staticmethod
    def _gather(t: Tensor, index: Tensor) -> Tensor:
        return t.gather(2, SlotStore._slot_index(index, t))

    @staticmethod
    def _bcast(mask: Tensor, like: Tensor) -> Tensor:
        return mask.reshape(*mask.shape, *([1] * (like.dim() - 3)))

    @staticmethod
    def _fill(index: Tensor, index_valid: Tensor) -> tuple[Tensor, Tensor]:
        """Write indices without duplicates of different values: padding entries (``index_valid``
        false, after the real ones) repeat a head's first entry, and ``src`` index 0."""
        first = index[..., :1].expand_as(index)
        dst = torch.where(index_valid, index, first)
        src = torch.where(index_valid, torch.arange(index.shape[-1], device=index.device), 0)
        return dst, src

    def _put(self, index: Tensor, index_valid: Tensor, slots: SlotState, stats: dict[str, Tensor], changed: tuple[str, ...]) -> None:
        """Write the ``changed`` fields of ``slots`` ``[B, H, U]`` over the slots at ``index`` (where
        ``index_valid``; padding entries come after a head's real ones), in place; changed
        statistics into ``stats``. A head with no real entry rewrites its slot ``index[..., 0]``
        with its own contents."""
        pairs: list[tuple[Tensor, Tensor]] = []
        for f in ("keys", "values"):
            if f in changed:
                parts = self.codec.parts(getattr(slots, f))
                pairs += [(self.parts[f"{f}.{k}"], t) for k, t in parts.items()]
        pairs += [(self.parts[f], getattr(slots, f)) for f in ("positions", "log_weights") if f in changed]
        pairs += [(stats[k[6:]], slots.stats[k[6:]]) for k in changed if k.startswith("stats.") and k[6:] in stats]
        self._write_at(pairs, index, index_valid)

    def _write_at(self, pairs: list[tuple[Tensor, Tensor]], index: Tensor, index_valid: Tensor) -> None:
        """For each ``(buffer, slots)`` pair, write ``slots[b, h, j]`` over ``buffer[b, h, index[b, h, j]]``
        where ``index_valid``, in place (see :meth:`_put` for padding entries)."""
        dst, src = self._fill(index, index_valid)
        every_head = bool(index_valid[..., 0].all())  # then padding entries repeat a real write
        any_ok = index_valid[..., :1]
        for buf, t in pairs:
            new = self._gather(t, src).to(buf.dtype)
            if not every_head:
                new = torch.where(self._bcast(any_ok, new), new, self._gather(buf, dst))
            self._scatter(buf, dst, new)

    def rewrite(
        self, index: Tensor | None, index_valid: Tensor | None, keys: Tensor | None = None, positions: Tensor | None = None
    ) -> None:
        """Overwrite the keys ``[B, H, U, D]`` of the slots at ``index`` (padding entries after a
        head's real ones; ``None``: ``keys`` are all ``n`` held slots') and (optionally) every held
        slot's positions ``[B, H, n]``, in place (a re-index: re-rotated keys, renumbered positions)."""
        self.unpack()
        self._own()
        self.version += 1
        if keys is not None and index is None:
            for k, t in self.codec.parts(keys).items():
                self.parts[f"keys.{k}"][:, :, : self.n].copy_(t)
            self.copied_slots += self.n
        elif keys is not None and index_valid is not None and index.shape[-1]:
            self._write_at([(self.parts[f"keys.{k}"], t) for k, t in self.codec.parts(keys).items()], index, index_valid)
            self.copied_slots += index.shape[-1]
        if positions is not None:
            self.parts["positions"][:, :, : self.n].copy_(positions)
        self._view = None

    def evict(self, ev: Eviction) -> None:
        """Apply an in-place eviction (``docs/architecture.md``, "In-place eviction").

        The targets are overwritten with their merged contents, the evicted slots marked empty, and
        the store shrinks to the most content slots a head now holds: each head's valid slots past
        that length move into its first empty slots. Moves O(evicted + targets) slots (what
        ``copied_slots`` counts: at most targets + moved per row and head); slots stop being in
        position order (positions stay exact). No host synchronisation but the new length. A packed
        store returns to the dense layout first (:meth:`unpack`)."""
        self.unpack()
        self._own()
        self.version += 1
        n = self.n
        stats = {k: v.clone() for k, v in ev.stats.items()}  # small [B, H, n] bookkeeping
        u = ev.targets.shape[-1]
        if u:
            self._put(ev.targets, ev.targets_valid, ev.updated, stats, ev.changed)
        if ev.evict.shape[-1] == 1 and n > 1 and bool(ev.evict_valid.all()) and bool(self.parts["valid"][:, :, :n].all()):
            self._evict_one(ev.evict, stats)
            self.copied_slots += u + 1
            return
        # the evicted slots become empty (padding entries repeat a head's first evicted slot)
        dst, _ = self._fill(ev.evict, ev.evict_valid)
        any_ev = ev.evict_valid[..., :1].expand_as(dst)
        for k, empty_value in (("valid", False), ("positions", INVALID_POSITION), ("log_weights", 0.0)):
            buf = self.parts[k]
            self._scatter(buf, dst, torch.where(any_ev, torch.full_like(dst, empty_value, dtype=buf.dtype), buf.gather(2, dst)))
        for v in stats.values():
            held = self._gather(v, dst)
            self._scatter(v, dst, torch.where(self._bcast(any_ev, held), 0, held))
        valid = self.parts["valid"][:, :, :n]
        new_n = int(valid.sum(-1).max()) if valid.numel() else 0
        w = n - new_n
        if w > 0 and new_n > 0:
            tail = valid[:, :, new_n:]
            empty = ~valid[:, :, :new_n]
            rank = empty.long().cumsum(-1) - 1
            ar = torch.arange(new_n, device=valid.device).expand_as(rank)
            holes = torch.zeros(*valid.shape[:2], w + 1, dtype=torch.long, device=valid.device)
            holes.scatter_(-1, torch.where(empty & (rank < w), rank, w), ar)  # j-th empty slot of each head
            mover_rank = (tail.long().cumsum(-1) - 1).clamp(min=0)
            src = (new_n + torch.arange(w, device=valid.device)).expand_as(tail)
            # a valid tail slot moves into its head's next empty slot; the others rewrite themselves
            dst = torch.where(tail, holes.gather(-1, mover_rank), src)
            for t in (*self.parts.values(), *stats.values()):
                self._scatter(t, dst, self._gather(t, src))
        self.copied_slots += u + max(w, 0)
        self.n = new_n
        self.stats = {k: v[:, :, :new_n] for k, v in stats.items()}
        self._view = None

    def _evict_one(self, ev: Tensor, stats: dict[str, Tensor]) -> None:
        """The steady state of a decode-time method: every head of a store without empty slots
        drops one slot ``ev`` ``[B, H, 1]``; its last slot moves into the hole (few ops, no sync)."""
        n = self.n
        for t in (*self.parts.values(), *stats.values()):
            # the last slot of each head moves into its evicted slot (onto itself if it is the one)
            self._scatter(t, ev, t[:, :, n - 1 : n].clone())
        self.n = n - 1
        self.stats = {k: v[:, :, : n - 1] for k, v in stats.items()}
        self._view = None

    def truncate(self, n: int, stats: dict[str, Tensor] | None = None) -> None:
        """Keep the first ``n`` slots (drop what a scoring pass appended); optionally new stats."""
        if n != self.n:
            self.unpack()
        self.version += 1
        self.n = n
        self.stats = {k: v[:, :, :n] for k, v in (self.stats if stats is None else stats).items()}
        self._view = None

    def fork(self) -> SlotStore:
        """A store sharing these buffers copy-on-write (both are marked shared)."""
        new = SlotStore.__new__(SlotStore)
        new.__dict__.update(self.__dict__)
        new.parts = dict(self.parts)
        new.stats = dict(self.stats)
        new._view = None if self._view is None else self._view.replace(stats=new.stats)
        if self.parts:
            self.shared = new.shared = True
        return new
