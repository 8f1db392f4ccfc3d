"""kvframe's attention function, registered with transformers' ``AttentionInterface``.

It is active only while a model is attached (:func:`kvframe.attach`). For each layer it

1. completes the slots the cache just appended: their positions (from the model's
   ``position_ids``), and whether they are padding (from the 2-D attention mask);
2. attends over the slots with SDPA: each slot's log-weight is added to its logit, padding and
   ragged-head filler slots are masked, causality (and a sliding window) is decided by positions,
   so chunked prefill over a compressed cache stays causal. GQA runs without repeating keys;
3. runs the compressor when its trigger fires, with the pass's queries available to scorers.

While no slot was ever dropped, padded or re-weighted, it calls transformers' own SDPA path, so an
uncompressed run is bit-for-bit the vanilla computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvframe.cache import ACTIVE_UPDATE, SlotCache, SlotLayer
from kvframe.errors import UnsupportedModelError
from kvframe.kernels.decode import DECODE_MAX_QUERIES, slot_attention_reference, slot_decode_attention
from kvframe.kernels import use_triton
from kvframe.kernels.packed import slot_decode_attention_packed
from kvframe.layer_pass import PassMeta, after_attention, finalize_new_slots, record_scoring_pass, wants_attention_stats
from kvframe.slots import SlotState
from kvframe.stats import decode_attention_with_mass

ATTENTION_NAME = "kvframe"


def kvframe_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """Mask function registered under ``"kvframe"``: hand the 2-D padding mask through unchanged.

    Causality and windows are decided per slot from positions inside the attention function, so
    no ``[q, kv]`` mask is ever materialised by the model.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise UnsupportedModelError(
            f"kvframe expects a 2-D padding mask [batch, tokens]; got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def _query_meta(
    q_len: int, batch: int, seen_before: int, attention_mask: Tensor | None, position_ids: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Positions ``[B, q]`` and validity ``[B, q]`` of the new tokens."""
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[-1] < q_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but {q_len} new tokens were given"
            )
        valid = attention_mask[:, -q_len:].to(device=device, dtype=torch.bool)
        if valid.shape[0] != batch:
            valid = valid.expand(batch, -1)
    else:
        valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
    if position_ids is not None and position_ids.shape[-1] == q_len:
        pos = position_ids.to(device).long()
        if pos.dim() == 3:  # multimodal rotary layouts [3, B, q]: use the text axis
            pos = pos[0]
        pos = pos.expand(batch, -1)
    elif attention_mask is not None and attention_mask.dim() == 2:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:].to(device)
    else:
        pos = (seen_before + torch.arange(q_len, device=device)).expand(batch, -1)
    return pos, valid


def _pass_meta(
    cache: SlotCache, q: int, batch: int, seen_before: int, attention_mask: Tensor | None, position_ids: Tensor | None,
    device: torch.device,
) -> PassMeta:
    """The pass's :class:`~kvframe.layer_pass.PassMeta`, computed by its first layer and reused by
    the others: the model hands every layer the same mask and position tensors (the memo holds them,
    so their identity cannot be reused by other tensors while it lives)."""
    key = (q, batch, seen_before, device)
    memo = cache.pass_memo
    if memo is not None and memo[0] is attention_mask and memo[1] is position_ids and memo[2] == key:
        return memo[3]
    qpos, qvalid = _query_meta(q, batch, seen_before, attention_mask, position_ids, device)
    meta = PassMeta(qpos, qvalid, seen_before)
    cache.pass_memo = (attention_mask, position_ids, key, meta)
    return meta


def _attend(
    query: Tensor, state: SlotState, qpos: Tensor, scaling: float | None, sliding_window: int | None, heads_uniform: bool
) -> Tensor:
    """SDPA over slots. ``query`` ``[B, Hq, q, D]``; returns ``[B, Hq, q, Dv]``.

    ``qpos`` is ``[B, q]``, or ``[B, H_kv, q]`` when query positions differ per KV head (re-index mode).
    Passes of at most :data:`~kvframe.kernels.decode.DECODE_MAX_QUERIES` queries (decoding) that need
    no gradient run the op ``kvframe::slot_decode_attention`` (flash-decoding in Triton on CUDA);
    the others, and every pass on the torch backend, compute the same SDPA in torch
    (:func:`~kvframe.kernels.decode.slot_attention_reference`).
    """
    heads_uniform = heads_uniform and qpos.dim() == 2
    sl = slice(0, 1) if heads_uniform else slice(None)  # uniform heads: one [B, 1, S] mask for all
    args = (query, state.keys, state.values, state.log_weights[:, sl], state.positions[:, sl], state.valid[:, sl], qpos)
    grad = torch.is_grad_enabled() and (query.requires_grad or state.keys.requires_grad or state.values.requires_grad)
    if query.shape[2] <= DECODE_MAX_QUERIES and not grad:
        return slot_decode_attention(*args, scaling=scaling, sliding_window=sliding_window)
    return slot_attention_reference(*args, scaling, sliding_window)


def kvframe_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered under ``"kvframe"`` (see module docstring)."""
    if softcap is not None:
        raise UnsupportedModelError("kvframe attention does not support attention logit soft-capping (Gemma2-style)")
    if kwargs.get("output_attentions"):
        raise UnsupportedModelError("kvframe attention does not return attention weights (output_attentions=True)")
    layer_idx = getattr(module, "layer_idx", None)
    active = ACTIVE_UPDATE.get()
    if active is not None:
        ACTIVE_UPDATE.set(None)  # do not keep the cache alive after its last use
    position_ids = kwargs.get("position_ids")
    b, _, q, _ = query.shape

    cache: SlotCache | None = None
    if active is not None and layer_idx is not None:
        c, idx = active
        if idx == layer_idx and c.layers[idx].pending and c.layers[idx].returned_keys is key:
            cache = c
            c.layers[idx].returned_keys = None
    if cache is None:
        if key.shape[2] != q:
            raise UnsupportedModelError(
                "kvframe attention received keys from a cache it does not manage; inside kvframe.attach pass no "
                "past_key_values (one is created) or a kvframe.SlotCache"
            )
        qpos, qvalid = _query_meta(q, b, 0, attention_mask, position_ids, query.device)
        if bool(qvalid.all()) and (sliding_window is None or q <= sliding_window):
            return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling)
        state = SlotState.from_tensors(key, value, positions=qpos, valid=qvalid)
        out = _attend(query, state, qpos, scaling, sliding_window, heads_uniform=True)
        return out.transpose(1, 2).contiguous(), None

    layer = cache.layers[layer_idx]
    meta = _pass_meta(cache, q, b, layer.seen - layer.pending, attention_mask, position_ids, query.device)
    qpos, qvalid = meta.qpos, meta.qvalid
    new_pos = finalize_new_slots(cache, layer, layer_idx, meta)
    window = layer.sliding_window if layer.is_sliding else sliding_window
    n_slots = layer.num_slots

    if layer.shift is not None:  # re-index mode: queries move with their keys
        g = query.shape[1] // layer.batch_heads[1]
        qshift = layer.shift.repeat_interleave(g, dim=1)[:, :, None].expand(-1, -1, q)
        query = cache.rope.rotate(query, -qshift, layer_idx)
        attn_qpos = new_pos
    else:
        attn_qpos = qpos

    measured = None
    grad = torch.is_grad_enabled() and (query.requires_grad or _slots_require_grad(layer))
    stats_pass = not cache.scoring and (wants_attention_stats(cache) or cache.needs_queries)
    if layer.plain and q in (1, n_slots) and (window is None or n_slots <= window):
        # never padded, compressed or re-indexed: the held keys and values are what update returned
        out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling)
    elif layer.store.packed and not layer.in_scratch and q <= DECODE_MAX_QUERIES and not grad and not stats_pass and use_triton(query):
        # a packed store (ragged heads): the kernel reads each head's segment, no padded view
        out = _attend_packed(layer, query, attn_qpos, scaling, window).transpose(1, 2).contiguous()
    else:
        state = layer.state
        assert state is not None
        if q == 1 and stats_pass and not use_triton(query) and not grad:
            # a decode step whose compressor reads attention statistics or the query's attention
            # (TOVA): one softmax for the output and for them
            out, mass, seen = decode_attention_with_mass(query, state, attn_qpos, qvalid, scaling, window)
            measured = (mass, seen)
            out = out.transpose(1, 2).contiguous()
        else:
            out = _attend(query, state, attn_qpos, scaling, window, heads_uniform=layer.heads_uniform)
            out = out.transpose(1, 2).contiguous()

    if cache.scoring:
        record_scoring_pass(cache, layer, query, attn_qpos, qvalid, scaling, window)
    else:
        after_attention(cache, layer, layer_idx, query, qpos, qvalid, scaling, window, attn_qpos, measured)
    return out, None


def _slots_require_grad(layer: SlotLayer) -> bool:
    """Whether the layer's keys or values take part in autograd (a backward scoring pass)."""
    if layer.in_scratch:
        return layer.scratch is not None and (layer.scratch.keys.requires_grad or layer.scratch.values.requires_grad)
    return any(t.requires_grad for t in layer.store.parts.values())


def _attend_packed(layer: SlotLayer, query: Tensor, qpos: Tensor, scaling: float | None, window: int | None) -> Tensor:
    """Decode attention straight over a packed store's segments (``kvframe::slot_decode_attention_packed``)."""
    store = layer.store
    parts, start, length = store.packed_slots()
    return slot_decode_attention_packed(
        query, store.decode("keys"), store.decode("values"), parts["log_weights"], parts["positions"], parts["valid"], start, length, qpos,
        scaling=scaling, sliding_window=window,
    )
