"""Per-slot statistics the framework keeps for policies, and who keeps each.

A policy declares the statistics it reads (``Policy.stats``). The framework keeps these ones:

``attn``
    Accumulated attention: the attention probability each slot has received, summed over every
    query of every real pass since the slot entered (prompt and decoding) and over the query heads
    of its KV group. H2O's heavy-hitter score, CaM's ``A``, WeightedKV's ``a``.
``age``
    How many queries could see the slot so far (WeightedKV's ``n``: the number of steps the slot
    has been in the cache, the step it entered included). ``attn / (age * G)`` is the average
    attention per query and head.
``window_attn``
    Attention from the queries of the most recent pass only (summed over those queries and the
    group): the chunk's scoring pass for chunked triggers with a scoring pass, otherwise the last
    real pass. AsymKV's and KVSlimmer's per-window attention mass ``m_j = l_j sum_q w_{q,j}``
    (probabilities include the log-weight, so the count factor ``l_j`` is already in).
``grad``
    ``[B, H, T, D]`` gradient of the chunk's language-model loss with respect to each slot's
    **pre-RoPE** key, from a ``scoring_pass: backward`` trigger (AsymKV's Fisher information).

Policies may keep their own statistics (``Policy.provides``, updated in ``Policy.observe``), such
as KVSlimmer's Hessian proxy. Merged slots keep the statistics of the kept slot unless the merge
policy updates them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvframe.slots import SlotState

#: statistic -> who provides it ("attention": kvframe's attention function on every real pass;
#: "scoring": the scoring pass of a chunked trigger; "backward": a backward scoring pass)
STAT_SOURCES = {"attn": "attention", "age": "attention", "window_attn": "attention", "grad": "backward"}


def attention_mass(
    state: SlotState,
    query: Tensor,
    query_positions: Tensor,
    query_valid: Tensor,
    scaling: float | None,
    sliding_window: int | None = None,
    chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """Attention received by each slot from ``query`` ``[B, Hq, Q, D]`` (float32, no grad).

    Returns ``(mass, seen)``, both ``[B, H, T]``: ``mass`` sums the softmax probabilities (with
    log-weights, padding and causality by position) over the valid queries and the query heads of
    each KV group; ``seen`` counts the valid queries that could see each slot. Rows are computed
    ``chunk`` queries at a time, never the full ``Q x T`` matrix at once.
    """
    with torch.no_grad():
        b, hq, nq, d = query.shape
        h = state.num_heads
        g = hq // h
        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        t = state.num_slots
        # one mask/bias for all heads when they hold the same slots (the usual case)
        uniform = bool((state.positions == state.positions[:, :1]).all()) and bool((state.valid == state.valid[:, :1]).all())
        pos = state.positions[:, :1] if uniform else state.positions  # [B, H', T]
        valid = state.valid[:, :1] if uniform else state.valid
        lw = state.log_weights.float()
        keys_t = state.keys.detach().float().transpose(-1, -2)  # [B, H, D, T]
        qpos = query_positions.to(query.device)
        qval = query_valid.to(query.device)
        if qpos.dim() == 2:
            qpos = qpos[:, None, :]  # [B, 1 or H, Q]
        mass = torch.zeros(b, h, t, device=query.device)
        seen = torch.zeros(b, valid.shape[1], t, device=query.device)
        # a chunk of queries sees no slot after the last one (by index) at or before its largest
        # position, so each chunk only touches a prefix of the slots (a chunked prefill's early
        # chunks skip the later ones; slots need not be stored in position order for this)
        last_pos = torch.where(valid, pos, -1)
        idx1 = torch.arange(1, t + 1, device=query.device)
        for s in range(0, nq, chunk):
            e = min(nq, s + chunk)
            w = e - s
            qp = qpos[:, :, s:e]  # [B, H'', w]
            seeable = (last_pos >= 0) & (last_pos <= qp.max())  # [B, H', T]
            cut = t if w == nq and nq <= 4 else max(1, int((idx1 * seeable).max()))
            vis = valid[:, :, None, :cut] & (pos[:, :, None, :cut] <= qp[..., None])  # [B, H', w, cut]
            if sliding_window is not None:
                vis = vis & (qp[..., None] - pos[:, :, None, :cut] < sliding_window)
            vis = vis & qval[:, None, s:e, None]
            empty = ~vis.any(-1, keepdim=True)  # padding queries: attend anywhere, then weigh 0
            bias = torch.where(vis | empty, 0.0, float("-inf"))
            qc = query[:, :, s:e].detach().float().reshape(b, h, g * w, d)
            logits = torch.matmul(qc, keys_t[..., :cut]).mul_(scale)
            logits = logits.view(b, h, g, w, cut).add_(lw[:, :, None, None, :cut]).add_(bias[:, :, None])
            probs = torch.softmax(logits, dim=-1)
            if bool(empty.any()):
                probs = probs * (~empty)[:, :, None].float()
            mass[..., :cut] += probs.sum(dim=(2, 3))
            seen[..., :cut] += vis.sum(dim=2).float()
        return mass, seen.expand(b, h, t).clone()


def decode_attention_with_mass(
    query: Tensor,
    state: SlotState,
    query_positions: Tensor,
    query_valid: Tensor,
    scaling: float | None,
    sliding_window: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decoding pass's attention output *and* the statistics :func:`attention_mass` would
    compute for it, from one softmax (the torch path of a decode step whose compressor reads
    attention statistics; it saves a second pass over the keys).

    ``query`` ``[B, Hq, q, D]`` (few queries), ``query_positions`` ``[B, q]`` or ``[B, H, q]``.
    Returns ``(out [B, Hq, q, Dv] in the query's dtype, mass [B, H, T], seen [B, H, T])`` with the
    masking of :func:`kvframe.kernels.decode.slot_attention_reference` (a query that sees no slot
    attends to every slot, its output unused) and of :func:`attention_mass` (such queries, and
    padding queries, add no mass)."""
    with torch.no_grad():
        b, hq, nq, d = query.shape
        h, t = state.num_heads, state.num_slots
        g = hq // h
        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        qp = query_positions.to(query.device)
        qp = qp[:, None, :, None] if qp.dim() == 2 else qp[..., None]  # [B, 1 or H, q, 1]
        vis = state.valid[:, :, None, :] & (state.positions[:, :, None, :] <= qp)  # [B, H, q, T]
        if sliding_window is not None:
            vis = vis & (qp - state.positions[:, :, None, :] < sliding_window)
        qval = query_valid.to(query.device)[:, None, :, None]  # [B, 1, q, 1]
        seen_by = vis & qval
        empty = ~vis.any(-1, keepdim=True)
        logits = torch.matmul(query.float().reshape(b, h, g * nq, d), state.keys.float().transpose(-1, -2)).mul_(scale)
        logits = logits.view(b, h, g, nq, t).add_(state.log_weights.float()[:, :, None, None, :])
        logits = logits.masked_fill_(~(vis | empty)[:, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs.view(b, h, g * nq, t), state.values.float()).view(b, hq, nq, -1).to(query.dtype)
        weight = (~empty & qval).float()[:, :, None]  # [B, H, 1, q, 1]
        mass = (probs * weight).sum(dim=(2, 3))
        seen = seen_by.sum(dim=2).float()
        return out, mass, seen
