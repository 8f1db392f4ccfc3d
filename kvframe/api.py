"""``kvframe.compress``: run a compressor on plain tensors, without a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvframe.compressor import Compressor
from kvframe.errors import ConfigError
from kvframe.policies.base import CompressionContext
from kvframe.slots import SlotState


@dataclass
class CompressResult:
    """Kept slots, per row and KV head, in position order.

    ``keys``/``values`` ``[B, H, S, D]``, ``positions`` ``[B, H, S]`` (-1 for filler),
    ``log_weights`` ``[B, H, S]``, ``valid`` ``[B, H, S]``: heads that keep fewer than ``S`` slots
    (ragged budgets) are padded with invalid filler. :meth:`head` returns one head without filler.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    log_weights: Tensor
    valid: Tensor
    state: SlotState

    def head(self, b: int, h: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(keys, values, positions, log_weights)`` of row ``b``, KV head ``h``, content only."""
        m = self.valid[b, h]
        return self.keys[b, h][m], self.values[b, h][m], self.positions[b, h][m], self.log_weights[b, h][m]

    @property
    def kept_per_head(self) -> Tensor:
        return self.valid.sum(-1)


def compression_inputs(
    compressor: Compressor,
    keys: Tensor,
    values: Tensor,
    queries: Tensor | None = None,
    *,
    positions: Tensor | None = None,
    valid: Tensor | None = None,
    log_weights: Tensor | None = None,
    layer_idx: int = 0,
    num_layers: int = 1,
    scaling: float | None = None,
    stats: dict[str, Tensor] | None = None,
    step: int = 0,
) -> tuple[SlotState, CompressionContext]:
    """The :class:`SlotState` and :class:`CompressionContext` that :func:`compress` runs the compressor
    on (arguments as there), for callers that drive ``Compressor.compress_step`` themselves."""
    if not isinstance(compressor, Compressor):
        raise ConfigError(f"compress needs a kvframe Compressor (see kvframe.build); got {type(compressor).__name__}")
    state = SlotState.from_tensors(keys, values, positions=positions, log_weights=log_weights, valid=valid)
    if stats:
        for name, stat in stats.items():
            if stat.shape[:3] != state.valid.shape:
                raise ConfigError(
                    f"statistic {name!r} has shape {tuple(stat.shape)}; expected [batch, kv_heads, tokens(, ...)] "
                    f"starting with {tuple(state.valid.shape)}"
                )
        state = state.with_stats(**{k: v.to(keys.device) for k, v in stats.items()})
    qpos = qvalid = None
    if queries is not None:
        if queries.dim() != 4 or queries.shape[0] != keys.shape[0] or queries.shape[-1] != keys.shape[-1]:
            raise ConfigError(
                f"queries must be [batch, query_heads, tokens, head_dim] matching keys {tuple(keys.shape)}; got {tuple(queries.shape)}"
            )
        if queries.shape[1] % keys.shape[1]:
            raise ConfigError(f"query heads ({queries.shape[1]}) must be a multiple of KV heads ({keys.shape[1]})")
        nq = queries.shape[2]
        if nq > keys.shape[2]:
            raise ConfigError(f"{nq} queries but only {keys.shape[2]} keys; queries are the last tokens of the keys")
        # padding queries (position -1) take the last real position before them
        qpos = torch.cummax(state.positions[:, 0, -nq:], dim=-1).values.clamp(min=0)
        qvalid = state.valid[:, 0, -nq:]
    ctx = CompressionContext(
        layer_idx=layer_idx,
        num_layers=num_layers,
        queries=queries,
        query_positions=qpos,
        query_valid=qvalid,
        scaling=scaling,
        phase="prefill",
        strict=not compressor.trigger.capacity,
        step=step,
        generator=torch.Generator(device=keys.device).manual_seed(compressor.seed),
    )
    return state, ctx


def compress(
    compressor: Compressor,
    keys: Tensor,
    values: Tensor,
    queries: Tensor | None = None,
    *,
    positions: Tensor | None = None,
    valid: Tensor | None = None,
    log_weights: Tensor | None = None,
    layer_idx: int = 0,
    num_layers: int = 1,
    scaling: float | None = None,
    stats: dict[str, Tensor] | None = None,
    step: int = 0,
) -> CompressResult:
    """Compress standalone ``keys``/``values`` ``[B, H, T, D]`` with ``compressor``.

    ``queries`` ``[B, H_q, Q, D]`` are the queries of the pass (the last ``Q`` tokens, positions
    ``T-Q..T-1`` unless ``positions`` says otherwise); scorers that read attention need them.
    ``valid`` ``[B, T]`` or ``[B, H, T]`` marks padding (false). ``stats`` are per-slot statistics
    ``[B, H, T]`` or ``[B, H, T, D]`` put on the slots (e.g. ``window_attn``, ``grad``, see
    :mod:`kvframe.stats`); ``step`` is the number of earlier trigger firings (``ctx.step``).
    Returns the kept slots.
    """
    state, ctx = compression_inputs(
        compressor, keys, values, queries, positions=positions, valid=valid, log_weights=log_weights,
        layer_idx=layer_idx, num_layers=num_layers, scaling=scaling, stats=stats, step=step,
    )
    out = compressor.compress(state, ctx)
    return CompressResult(out.keys, out.values, out.positions, out.log_weights, out.valid, out)
