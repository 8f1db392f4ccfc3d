"""One layer's pass over new tokens: the one module that changes a :class:`SlotLayer`'s slots.

kvframe's attention function (:mod:`kvframe.attention`) computes attention; everything else that
happens when a layer sees new tokens happens here, in this order:

1. :func:`finalize_new_slots`: the appended slots get their positions (from the model's
   ``position_ids``) and validity (from the 2-D padding mask); in re-index mode they move into
   cache positions (keys re-rotated); the layer's per-row bookkeeping advances;
2. after attention, :func:`after_attention`: the framework-kept statistics are updated
   (``attn``, ``age``, ``window_attn``), the compressor's trigger is asked, the compressor runs
   (:func:`apply_compression`: compress, re-index) and a sliding-window layer is trimmed to its
   window; during a chunked trigger's scoring pass, :func:`record_scoring_pass` instead keeps what
   compression of the past will read.

``SlotLayer.update`` (appending) and the chunked driver's scratch/snapshot calls are the only other
writers of layer state. Nothing here imports a policy module: the compressor is reached through
its interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvframe.cache import SlotCache, SlotLayer
from kvframe.policies.base import CompressionContext, TriggerEvent
from kvframe.slots import INVALID_POSITION, Eviction, SlotState, position_rank, true_slots_first
from kvframe.stats import attention_mass


@dataclass
class PassMeta:
    """What one forward pass's new tokens are, the same for every layer (computed once per pass by
    the attention function): positions and validity ``[B, q]``, the positions a slot stores
    (invalid where padding) ``[B, 1, q]``, valid tokens per row, the next original position per row,
    and whether the pass continues a plain (unpadded, in-order) sequence."""

    qpos: Tensor
    qvalid: Tensor
    seen_before: int
    written: Tensor | None = None
    n_new: Tensor | None = None
    nxt: Tensor | None = None
    in_order: bool | None = None

    def __post_init__(self) -> None:
        self.written = torch.where(self.qvalid, self.qpos, INVALID_POSITION)[:, None, :]
        self.n_new = self.qvalid.sum(-1)
        self.nxt = torch.where(self.qvalid, self.qpos, -1).max(dim=-1).values + 1

    def continues_plain(self) -> bool:
        if self.in_order is None:
            expected = self.seen_before + torch.arange(self.qpos.shape[-1], device=self.qpos.device)
            self.in_order = bool((self.qvalid & (self.qpos == expected)).all())
        return self.in_order


def finalize_new_slots(cache: SlotCache, layer: SlotLayer, layer_idx: int, meta: PassMeta) -> Tensor:
    """Write the new slots' positions and validity; in re-index mode move them into cache positions.
    Returns the new slots' positions ``[B, H, q]`` (cache positions in re-index mode)."""
    q = layer.pending
    b, h = layer.batch_heads
    qpos, qvalid = meta.qpos, meta.qvalid
    new_valid = qvalid[:, None, :].expand(b, h, q)
    if layer.shift is not None:
        new_pos = qpos[:, None, :] - layer.shift[:, :, None]
        rot = cache.rope.rotate(layer.tail_keys(q), -layer.shift[:, :, None].expand(b, h, q), layer_idx)
        layer.write_tail(q, keys=rot)
        layer.write_tail(q, positions=torch.where(new_valid, new_pos, INVALID_POSITION), valid=new_valid)
    else:
        new_pos = qpos[:, None, :].expand(b, h, q)
        assert meta.written is not None
        layer.write_tail(q, positions=meta.written.expand(b, h, q), valid=new_valid)
    if layer.valid_seen is None:
        layer.valid_seen = torch.zeros_like(meta.n_new)
    if q == 1 and layer.prompt_valid is None and layer.seen > 1:
        layer.prompt_valid = layer.valid_seen.clone()  # decoding starts: freeze the prompt length
    layer.valid_seen = layer.valid_seen + meta.n_new
    assert meta.nxt is not None
    layer.next_position = meta.nxt if layer.next_position is None else torch.maximum(layer.next_position, meta.nxt)
    if layer.plain and (layer.shift is not None or not meta.continues_plain()):
        layer.plain = False
    layer.pending = 0
    return new_pos


def _reindexed_positions(state: SlotState) -> tuple[Tensor, Tensor]:
    """Each head's content slots renumbered ``0..n-1`` in position order (slots may be stored out of
    order), and the rotation ``delta`` every slot's key needs."""
    new_pos = torch.where(state.valid, position_rank(state.valid, state.positions), INVALID_POSITION)
    return new_pos, torch.where(state.valid, new_pos - state.positions, 0)


def _reindex(cache: SlotCache, layer_idx: int, state: SlotState, next_position: Tensor) -> tuple[SlotState, Tensor]:
    """Renumber each head's content slots ``0..n-1`` (keys re-rotated); returns the state and shift."""
    new_pos, delta = _reindexed_positions(state)
    keys = cache.rope.rotate(state.keys, delta, layer_idx)
    n = state.valid.sum(-1)  # [B, H]
    shift = next_position[:, None] - n
    return state.replace(keys=keys, positions=new_pos), shift


def _reindex_in_place(cache: SlotCache, layer: SlotLayer, layer_idx: int) -> None:
    """:func:`_reindex` on the store itself: only the keys whose position changes are re-rotated
    and rewritten, gathered when they are few, all keys in one pass when they are most (after a
    StreamingLLM eviction: the slots newer than the evicted one; a rotation by 0 is exact)."""
    state = layer.store.view()
    assert state is not None and layer.next_position is not None
    new_pos, delta = _reindexed_positions(state)
    changed = delta != 0
    m = int(changed.sum(-1).max()) if changed.numel() else 0
    if 2 * m > state.num_slots:  # most keys move (StreamingLLM: all newer than the evicted one): rotate all
        layer.store.rewrite(None, None, keys=cache.rope.rotate(state.keys, delta, layer_idx), positions=new_pos)
    elif m:
        idx = true_slots_first(changed)[..., :m]
        ok = idx < state.num_slots
        idx = torch.where(ok, idx, 0)
        keys = state.keys.gather(2, idx[..., None].expand(-1, -1, -1, state.keys.shape[-1]))
        keys = cache.rope.rotate(keys, delta.gather(-1, idx), layer_idx)
        layer.store.rewrite(idx, ok, keys=keys, positions=new_pos)
    layer.shift = layer.next_position[:, None] - state.valid.sum(-1)


def record_scoring_pass(
    cache: SlotCache, layer: SlotLayer, query: Tensor, qpos: Tensor, qvalid: Tensor, scaling: float | None, window: int | None
) -> None:
    """During a chunked trigger's scoring pass: keep what compression of the past will read."""
    comp = cache.compressor
    state = layer.state
    assert state is not None
    if "window_attn" in cache.stats_needed:
        mass, _ = attention_mass(state, query, qpos, qvalid, scaling, window)
        layer.state = state.with_stats(window_attn=mass)
    if cache.needs_queries:
        layer.scoring_queries = (query.detach(), qpos, qvalid, scaling)
    layer.release_view()


def wants_attention_stats(cache: SlotCache) -> bool:
    """Whether a real pass must measure the attention each slot receives (``attn``, ``age``,
    ``window_attn`` statistics), i.e. whether :func:`after_attention` will compute them."""
    need = cache.stats_needed
    return "attn" in need or "age" in need or ("window_attn" in need and cache.compressor.trigger.scoring_pass == "none")


def _update_stats(
    cache: SlotCache,
    layer: SlotLayer,
    query: Tensor,
    qpos: Tensor,
    qvalid: Tensor,
    scaling: float | None,
    window: int | None,
    measured: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Accumulate the framework-kept statistics the compressor's policies read (see kvframe.stats);
    ``measured``: the pass's ``(mass, seen)`` if attention already computed them."""
    need = cache.stats_needed
    want_window = "window_attn" in need and cache.compressor.trigger.scoring_pass == "none"
    if not wants_attention_stats(cache):
        return
    state = layer.state
    assert state is not None
    mass, seen = measured if measured is not None else attention_mass(state, query, qpos, qvalid, scaling, window)
    upd: dict[str, Tensor] = {}
    if "attn" in need:
        upd["attn"] = state.stats.get("attn", torch.zeros_like(mass)) + mass
    if "age" in need:
        upd["age"] = state.stats.get("age", torch.zeros_like(seen)) + seen
    if want_window:
        upd["window_attn"] = mass
    layer.state = state.with_stats(**upd)


def compression_context(cache: SlotCache, layer: SlotLayer, layer_idx: int, phase: str, **kw: Any) -> CompressionContext:
    """The context of one trigger firing for ``layer``: budget reference, step, generator, rope."""
    state = layer.state
    assert state is not None
    ref_rows = layer.prompt_valid if (phase == "decode" and layer.prompt_valid is not None) else layer.valid_seen
    reference = None if ref_rows is None else ref_rows[:, None].expand(state.batch_size, state.num_heads)
    return CompressionContext(
        layer_idx=layer_idx,
        num_layers=cache.num_layers,
        phase=phase,
        rope=cache.rope,
        generator=cache.generator(state.keys.device),
        reference=reference,
        strict=phase == "prefill" and not cache.compressor.trigger.capacity,
        step=layer.compressions,
        **kw,
    )


def apply_compression(cache: SlotCache, layer: SlotLayer, layer_idx: int, ctx: CompressionContext) -> None:
    """Fire the compressor on ``layer`` and install the result (re-indexing positions if asked)."""
    comp = cache.compressor
    state = layer.state
    assert state is not None
    # wall-clock timing is host-side bookkeeping: skipped while torch.compile traces a compiled model
    # forward (it would only break the graph; the traced code runs later, untimed)
    timed = not torch.compiler.is_compiling()
    t0 = time.perf_counter() if timed else 0.0
    new_state, compressed = comp.compress_step(state, ctx, in_place=not layer.in_scratch)
    if isinstance(new_state, Eviction):  # decode-time: evict in place, O(evicted) slots moved
        layer.store.evict(new_state)
        if comp.positions == "reindex":
            _reindex_in_place(cache, layer, layer_idx)
    else:
        if compressed and comp.positions == "reindex":
            assert layer.next_position is not None
            new_state, layer.shift = _reindex(cache, layer_idx, new_state, layer.next_position)
        layer.state = new_state
    if timed:
        cache.compression_seconds += time.perf_counter() - t0
    if compressed:
        layer.plain = False
        layer.heads_uniform = False
    layer.compressions += 1


def after_attention(
    cache: SlotCache,
    layer: SlotLayer,
    layer_idx: int,
    query: Tensor,
    qpos: Tensor,
    qvalid: Tensor,
    scaling: float | None,
    window: int | None,
    attn_qpos: Tensor | None = None,
    measured: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Update statistics, run the compressor if its trigger fires; trim sliding-window layers.

    ``measured``: ``(mass, seen)`` of this pass when the attention computed them
    (:func:`kvframe.stats.decode_attention_with_mass`); a one-query pass's mass then also gives
    the compressor the last query's attention (``ctx.window_scores(state, 1)``) without
    recomputing it."""
    comp = cache.compressor
    q = query.shape[2]
    _update_stats(cache, layer, query, qpos if attn_qpos is None else attn_qpos, qvalid, scaling, window, measured)
    event = TriggerEvent(
        slots_before=layer.slots_before,
        new_tokens=q,
        slots_after=layer.num_slots,
        decode_steps=layer.decode_steps,
        compressions=layer.compressions,
    )
    if (not layer.is_sliding or comp.compress_sliding_layers) and comp.trigger.fires(event):
        ctx = compression_context(
            cache,
            layer,
            layer_idx,
            event.phase,
            queries=query if cache.needs_queries else None,
            query_positions=qpos,
            query_valid=qvalid,
            scaling=scaling,
            sliding_window=window,
        )
        if layer.shift is not None:
            ctx.query_positions = (qpos[:, None, :] - layer.shift[:, :, None])[:, 0]
        if measured is not None and q == 1:
            # the one query's softmax row averaged over the group: what window_scores(state, 1) computes
            ctx._window_scores[1] = measured[0] / (query.shape[1] // layer.batch_heads[1])
        apply_compression(cache, layer, layer_idx, ctx)
    if layer.is_sliding and window is not None and layer.num_slots > window:
        state = layer.state
        assert state is not None
        last = torch.where(state.valid, state.positions, INVALID_POSITION).max(dim=-1, keepdim=True).values
        keep = state.valid & (state.positions > last - window + 1)
        if bool((keep.sum(-1) < state.num_slots).any()):
            layer.state = state.keep(keep)
            layer.plain = False
    layer.release_view()
