"""Synthetic inputs for ``kvframe.compress`` shaped like one SmolLM2-135M layer (shared by benchmarks).

:func:`synthetic_inputs` returns the keyword arguments ``kvframe.compress(comp, **kwargs)`` needs
for any registry card: keys and values ``[B, H_kv, T, D]``, the queries of the pass when a policy
of ``comp`` reads attention (``comp.needs_queries``), and every per-slot statistic the compressor's
policies read (``comp.stats``, see :data:`kvframe.stats.STAT_SOURCES`):

``attn`` / ``age``
    as after a causal prefill of ``T`` tokens: slot ``t`` was seen by ``age = T - t`` queries and
    received ``attn = G * age * share``, a log-normal share of attention (``G`` = query heads per KV
    head), with a few heavier "sink" slots at the start;
``window_attn``
    attention mass from the last scoring window (512 queries, summed over the KV group), same shape
    of distribution;
``grad``
    ``[B, H, T, D]`` key gradients (small Gaussian values, AsymKV's Fisher information).

Policy-owned statistics (KVSlimmer's ``hproxy``) are computed by the policy's own ``observe``, which
``kvframe.compress`` runs, so they need no input. The data are random (keys with a per-channel
scale, like post-RoPE keys with a few large channels); timings do not depend on the values except
through data-dependent selectors (adjacent-pair overlaps, the balanced walk), for which random inputs
are a plausible but not a real-attention case. Without a model there is no rotary service, so key
merges on pre-RoPE keys (``fisher``, ``kvslimmer``) skip the un-rotate/re-rotate they do in a model.
"""

from __future__ import annotations

from typing import Any

import torch

#: scoring-pass window of the chunked cards (their chunk size), for ``window_attn``
WINDOW_QUERIES = 512


def _attention_share(gen: torch.Generator, batch: int, kv_heads: int, t: int) -> torch.Tensor:
    """``[B, H, T]`` positive shares summing to 1 per head: log-normal, first 4 slots heavy (sinks)."""
    w = torch.exp(torch.randn(batch, kv_heads, t, generator=gen))
    w[..., : min(4, t)] *= 20.0
    return w / w.sum(-1, keepdim=True)


def synthetic_inputs(
    comp: Any,
    T: int,
    batch: int = 1,
    kv_heads: int = 3,
    q_heads: int = 9,
    head_dim: int = 64,
    seed: int = 0,
    n_queries: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Keyword arguments for ``kvframe.compress(comp, **kwargs)`` on ``T`` synthetic tokens.

    ``comp`` is a built :class:`kvframe.Compressor`. Queries ``[B, q_heads, Q, D]`` are included only
    when ``comp.needs_queries``; ``Q`` is ``n_queries`` or, by default, ``T`` (the whole prompt's
    queries, as after a one-shot prefill: H2O's observed attention reads them all, SnapKV and TOVA
    only the last window/token). Statistics are included for every name in ``comp.stats``.
    """
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    gen = torch.Generator().manual_seed(seed)
    g = q_heads // kv_heads
    chan = torch.exp(0.5 * torch.randn(head_dim, generator=gen))  # a few large key channels
    keys = (torch.randn(batch, kv_heads, T, head_dim, generator=gen) * chan).to(dtype)
    values = torch.randn(batch, kv_heads, T, head_dim, generator=gen).to(dtype)
    out: dict[str, Any] = {"keys": keys, "values": values}
    if comp.needs_queries:
        nq = T if n_queries is None else min(int(n_queries), T)
        out["queries"] = (torch.randn(batch, q_heads, nq, head_dim, generator=gen) * chan).to(dtype)
    stats: dict[str, torch.Tensor] = {}
    need = set(comp.stats)
    if need & {"attn", "age"}:
        age = torch.arange(T, 0, -1, dtype=torch.float32).expand(batch, kv_heads, T).clone()
        if "age" in need:
            stats["age"] = age
        if "attn" in need:
            stats["attn"] = g * age * _attention_share(gen, batch, kv_heads, T)
    if "window_attn" in need:
        stats["window_attn"] = g * min(WINDOW_QUERIES, T) * _attention_share(gen, batch, kv_heads, T)
    if "grad" in need:
        stats["grad"] = 1e-3 * torch.randn(batch, kv_heads, T, head_dim, generator=gen)
    if stats:
        out["stats"] = stats
    return out


def compress_kwargs_check(name: str, T: int = 256, **budget: Any) -> None:
    """Build card ``name`` and run ``kvframe.compress`` once on synthetic inputs (a smoke check)."""
    import kvframe

    comp = kvframe.build(name, **budget)
    res = kvframe.compress(comp, **synthetic_inputs(comp, T))
    assert res.keys.shape[2] <= T
