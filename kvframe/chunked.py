"""Chunked prefill for triggers with a ``chunk_size`` (``docs/methods.md#chunked-prefill-with-a-scoring-pass``).

:func:`kvframe.attach`'s forward wrapper calls :func:`chunked_forward` when a multi-token input
meets a compressor whose trigger asks for chunks. The prompt is fed ``size`` tokens at a time:

- ``scoring_pass: none``: each chunk runs once; the trigger compresses after each chunk's pass.
- ``scoring_pass: forward`` / ``backward``: every chunk that finds a non-empty cache (every chunk
  after the first of a prompt, and any later multi-token input such as an appended question)
  runs twice. The *scoring
  pass* runs the chunk on the current past and records, per layer, the attention the past's slots
  receive from the chunk's queries (statistic ``window_attn``) and, for ``backward``, the gradient
  of the chunk's next-token loss with respect to each past slot's pre-RoPE key (statistic
  ``grad``, from ``torch.autograd.grad``: parameters' ``.grad`` are never touched; dropped again once
  the past is compressed, so no key-sized tensor stays in the cache). The chunk's
  own keys and values are then discarded, every layer's past is compressed, and the *real pass*
  re-runs the chunk on the compressed past and appends it. Nothing is compressed after the last
  chunk (as in the AsymKV and KVSlimmer code).

The returned output carries the real passes' logits concatenated over chunks (only the last
chunk's when the caller passed ``logits_to_keep``), and the loss over the whole input if labels
were given.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvframe.cache import SlotCache
from kvframe.errors import ConfigError, UnsupportedModelError

#: arguments sliced along the token axis (dim 1, or dim 0 for cache_position)
_TOKEN_ARGS = ("input_ids", "inputs_embeds", "position_ids", "token_type_ids")


def num_tokens(arguments: dict[str, Any]) -> int:
    """New tokens in a forward call's keyword arguments (``input_ids`` or ``inputs_embeds``)."""
    for name in ("input_ids", "inputs_embeds"):
        x = arguments.get(name)
        if x is not None:
            return int(x.shape[1])
    return 0


def _chunk_arguments(arguments: dict[str, Any], past: int, s: int, e: int, n: int) -> dict[str, Any]:
    out = dict(arguments)
    for name in _TOKEN_ARGS:
        x = arguments.get(name)
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[-1 if name == "position_ids" else 1] == n:
            out[name] = x[..., s:e] if name == "position_ids" else x[:, s:e]
    cp = arguments.get("cache_position")
    if isinstance(cp, Tensor) and cp.shape[-1] == n:
        out["cache_position"] = cp[..., s:e]
    am = arguments.get("attention_mask")
    if isinstance(am, Tensor):
        if am.dim() != 2:
            raise UnsupportedModelError(f"chunked prefill needs a 2-D attention mask; got shape {tuple(am.shape)}")
        out["attention_mask"] = am[:, : past + e]
    out.pop("labels", None)
    return out


def chunked_forward(
    call: Callable[..., Any],
    arguments: dict[str, Any],
    cache: SlotCache,
    cache_arg: str,
    accepts_logits_to_keep: bool,
) -> Any:
    """Run one multi-token forward in chunks (see module docstring). ``call(**arguments)`` runs the model."""
    trigger = cache.compressor.trigger
    size = int(trigger.chunk_size)
    n = num_tokens(arguments)
    past = cache.get_seq_length()
    labels = arguments.get("labels")
    keep = arguments.get("logits_to_keep")
    want_all = keep in (None, 0)
    for flag in ("output_attentions", "output_hidden_states"):
        if arguments.get(flag):
            raise ConfigError(f"{flag}=True is not supported with a chunked trigger ({trigger.name!r}, size {size})")
    logits: list[Tensor] = []
    out = None
    for c, s in enumerate(range(0, n, size)):
        e = min(n, s + size)
        args = _chunk_arguments(arguments, past, s, e, n)
        args[cache_arg] = cache
        if trigger.scoring_pass != "none" and past > 0:  # every chunk that has a past to compress
            _scoring_pass(call, args, cache, backward=trigger.scoring_pass == "backward", accepts_logits_to_keep=accepts_logits_to_keep)
            _compress_past(cache)
        if accepts_logits_to_keep and not want_all:
            args["logits_to_keep"] = keep if e == n else 1
        out = call(**args)
        if want_all or e == n:
            logits.append(out.logits)
        past += e - s
    assert out is not None
    out.logits = torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]
    if labels is not None:
        shift_logits = out.logits[:, :-1].float()
        shift_labels = labels[:, 1:].to(shift_logits.device)
        out.loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100)
    return out


def _scoring_pass(call: Callable[..., Any], args: dict[str, Any], cache: SlotCache, backward: bool, accepts_logits_to_keep: bool) -> None:
    layers = cache.layers
    if backward and torch.is_inference_mode_enabled():
        raise ConfigError(
            "a backward scoring pass (AsymKV-style key gradients) cannot run under torch.inference_mode(); "
            "use torch.no_grad() (as generate does) or no grad context"
        )
    # the pass runs on dense stand-ins of the layers' states; the slot stores are not touched, so the
    # layers are restored by dropping the stand-ins and restoring their bookkeeping snapshots
    snapshots = []
    leaves: list[Tensor | None] = []
    for layer in layers:
        st = layer.state
        if backward and st is not None:
            leaf = st.keys.detach().requires_grad_(True)
            st = st.replace(keys=leaf)
            leaves.append(leaf)
        elif backward:
            leaves.append(None)
        snapshots.append(layer.begin_scratch(st))
    cache.scoring = True
    try:
        if backward:
            with torch.enable_grad():
                out = call(**({**args, "logits_to_keep": 0} if accepts_logits_to_keep else args))
                ids = args.get("input_ids")
                if ids is None:
                    raise ConfigError("a backward scoring pass needs input_ids (the chunk's next-token loss)")
                logits = out.logits[:, :-1].float()
                target = ids[:, 1:].to(logits.device)
                mask = args.get("attention_mask")
                tok_valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, -ids.shape[1] :].bool().to(logits.device)
                pair_valid = tok_valid[:, 1:] & tok_valid[:, :-1] if mask is not None else tok_valid
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
                loss = (nll * pair_valid.reshape(-1)).sum() / pair_valid.sum().clamp(min=1)
                todo = [(i, leaf) for i, leaf in enumerate(leaves) if leaf is not None]
                grads = torch.autograd.grad(loss, [leaf for _, leaf in todo], allow_unused=True)
        else:
            with torch.no_grad():
                if accepts_logits_to_keep:
                    args = {**args, "logits_to_keep": 1}
                call(**args)
    finally:
        cache.scoring = False
        for layer, snap in zip(layers, snapshots):
            layer.end_scratch(snap)
    if backward:
        for (i, leaf), g in zip(todo, grads):
            layer = layers[i]
            assert layer.state is not None
            st = layer.state
            g = torch.zeros_like(leaf, dtype=torch.float32) if g is None else g.float()
            if cache.rope is not None:  # d/dk_pre = R(p)^T d/dk_rot: rotate the gradient back by the position
                g = cache.rope.unrotate(g, torch.where(st.valid, st.positions, 0), i)
            layer.state = st.with_stats(grad=g)
            layer.release_view()


def _compress_past(cache: SlotCache) -> None:
    from kvframe.layer_pass import apply_compression, compression_context

    comp = cache.compressor
    for i, layer in enumerate(cache.layers):
        if layer.state is None or (layer.is_sliding and not comp.compress_sliding_layers):
            continue
        kw: dict[str, Any] = {"sliding_window": layer.sliding_window}
        if layer.scoring_queries is not None:
            q, qpos, qvalid, scaling = layer.scoring_queries
            kw.update(queries=q, query_positions=qpos if qpos.dim() == 2 else qpos[:, 0], query_valid=qvalid, scaling=scaling)
            layer.scoring_queries = None
        ctx = compression_context(cache, layer, i, "chunk", **kw)  # chunk phase: budgets are capacities
        apply_compression(cache, layer, i, ctx)
        if layer.state is not None and "grad" in layer.state.stats:
            # gradients are per chunk (AsymKV recomputes them at every scoring pass): do not hold a
            # second key-sized tensor in the cache while decoding
            layer.state = layer.state.replace(stats={k: v for k, v in layer.state.stats.items() if k != "grad"})
        layer.release_view()  # a packed store holds no dense view between passes
