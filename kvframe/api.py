"""``kvframe.compress``: run a compressor on plain tensors, without a model."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

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


_TENSOR_HINT = "pass torch tensors (e.g. torch.from_numpy(array) for a NumPy array)"


def _require_tensor(name: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        kind = type(x).__module__ + "." + type(x).__name__ if type(x).__module__ != "builtins" else type(x).__name__
        raise ConfigError(f"{name} must be a torch.Tensor; got {kind}; {_TENSOR_HINT}")


def _check_finite(name: str, x: Tensor, token_axis: str = "token") -> None:
    """``x`` ``[B, H, T, D]`` must hold no NaN or inf; the first bad entry is named."""
    # a finite sum proves every entry finite (NaN and inf propagate) at a fraction of the cost of an
    # elementwise test; a non-finite sum may also be an overflow of finite values, so look closer
    if bool(torch.isfinite(x.sum())):
        return
    nan = torch.isnan(x)
    bad = nan if bool(nan.any()) else ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    b, h, t = (int(i) for i in bad.nonzero()[0][:3])
    kind = "NaN" if bad is nan else "inf"
    raise ConfigError(
        f"{name} contain {kind} at row {b}, head {h}, {token_axis} {t}; kvframe.compress needs finite keys, values and queries"
    )


def _check_layout(name: str, x: Tensor, batch: int, heads: int, tokens: int, allowed: tuple[str, ...]) -> None:
    """``x`` is one of ``[T]`` (if allowed), ``[B, T]`` (``B`` may be 1) or ``[B, H, T]``."""
    shape = tuple(x.shape)
    ok = (
        ("[T]" in allowed and shape == (tokens,))
        or (len(shape) == 2 and shape[0] in (1, batch) and shape[1] == tokens)
        or shape == (batch, heads, tokens)
    )
    if not ok:
        want = " or ".join(allowed)
        raise ConfigError(
            f"{name} has shape {shape}; accepted: {want} with B={batch}, H={heads}, T={tokens} (from keys of shape "
            f"[B, H, T, D])"
        )


def check_inputs(
    keys: object,
    values: object,
    queries: object = None,
    *,
    positions: object = None,
    valid: object = None,
    log_weights: object = None,
    layer_idx: object = 0,
    num_layers: object = 1,
    stats: object = None,
) -> None:
    """Validate :func:`compress`'s inputs (see its docstring); raises :class:`ConfigError`.

    The order of ``positions`` is checked on the :class:`SlotState` by :func:`check_position_order`.
    """
    for name, x in (("keys", keys), ("values", values)):
        _require_tensor(name, x)
    for name, x in (("queries", queries), ("positions", positions), ("valid", valid), ("log_weights", log_weights)):
        if x is not None:
            _require_tensor(name, x)
    if stats is not None:
        if not isinstance(stats, dict):
            raise ConfigError(f"stats must be a dict of name -> torch.Tensor; got {type(stats).__name__}")
        for name, x in stats.items():
            _require_tensor(f"statistic {name!r}", x)
    assert isinstance(keys, Tensor) and isinstance(values, Tensor)
    if keys.dim() != 4 or values.dim() != 4:
        raise ConfigError(
            f"keys and values must be 4-D [batch, kv_heads, tokens, head_dim]; got shapes {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.shape[:3] != values.shape[:3]:
        raise ConfigError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree in batch, heads or tokens")
    tensors = [("keys", keys), ("values", values)] + ([("queries", queries)] if queries is not None else [])
    for name, x in tensors:
        if not x.is_floating_point():
            raise ConfigError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    for name, x in tensors[1:]:
        if x.dtype != keys.dtype or x.device != keys.device:
            raise ConfigError(
                f"{name} ({x.dtype} on {x.device}) must have the dtype and device of keys ({keys.dtype} on {keys.device}); "
                f"convert with {name}.to(keys)"
            )
    if isinstance(num_layers, bool) or not isinstance(num_layers, Integral) or num_layers < 1:
        raise ConfigError(f"num_layers={num_layers!r} must be an int >= 1 (the model's number of layers)")
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, Integral) or not 0 <= layer_idx < num_layers:
        raise ConfigError(f"layer_idx={layer_idx!r} must be an int in [0, num_layers) = [0, {num_layers})")
    b, h, t, _ = keys.shape
    if positions is not None:
        assert isinstance(positions, Tensor)
        _check_layout("positions", positions, b, h, t, ("[T]", "[B, T]", "[B, H, T]"))
        if positions.is_complex() or positions.dtype == torch.bool:
            raise ConfigError(f"positions must be an integer tensor; got dtype {positions.dtype}")
    if valid is not None:
        assert isinstance(valid, Tensor)
        if valid.dtype != torch.bool:
            raise ConfigError(
                f"valid must be a bool mask (True for content, False for padding); got dtype {valid.dtype}; "
                "convert a 0/1 attention mask with mask.bool()"
            )
        _check_layout("valid", valid, b, h, t, ("[B, T]", "[B, H, T]"))
    if log_weights is not None:
        assert isinstance(log_weights, Tensor)
        if tuple(log_weights.shape) != (b, h, t):
            raise ConfigError(f"log_weights has shape {tuple(log_weights.shape)}; accepted: [B, H, T] = {(b, h, t)}")
    for name, x in tensors:
        _check_finite(name, x, "query" if name == "queries" else "token")


def check_position_order(state: SlotState) -> None:
    """Positions of valid slots are >= 0 and strictly increasing along each row and head."""
    pos, valid = state.positions, state.valid
    if bool((valid & (pos < 0)).any()):
        b, h, j = (int(i) for i in (valid & (pos < 0)).nonzero()[0])
        raise ConfigError(f"positions must be >= 0 on valid slots; row {b}, head {h}, token {j} has position {int(pos[b, h, j])}")
    # the largest valid position before each slot (-1 if none)
    running = torch.cummax(torch.where(valid, pos, -1), dim=-1).values
    before = torch.cat([torch.full_like(running[..., :1], -1), running[..., :-1]], dim=-1)
    bad = valid & (pos <= before)
    if bool(bad.any()):
        b, h, j = (int(i) for i in bad.nonzero()[0])
        raise ConfigError(
            f"positions must be strictly increasing over the valid slots of each row and head (slots are stored in "
            f"position order); row {b}, head {h}: token {j} has position {int(pos[b, h, j])} after position {int(before[b, h, j])}"
        )


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
    check_inputs(keys, values, queries, positions=positions, valid=valid, log_weights=log_weights, layer_idx=layer_idx, num_layers=num_layers, stats=stats)
    state = SlotState.from_tensors(keys, values, positions=positions, log_weights=log_weights, valid=valid)
    check_position_order(state)
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
    ``layer_idx`` in ``[0, num_layers)`` tells layer-dependent schedules (PyramidKV) which layer
    this is. Returns the kept slots.

    Every input is checked first (:func:`check_inputs`), and a bad one raises
    :class:`~kvframe.errors.ConfigError` naming it and what is accepted: every tensor argument must be
    a ``torch.Tensor`` (convert NumPy arrays with ``torch.from_numpy``); ``keys`` and ``values`` are
    floating point, with the same dtype and device (``queries`` too); ``positions`` is ``[T]``,
    ``[B, T]`` or ``[B, H, T]`` and strictly increasing over the valid slots of each row and head
    (slots are stored in position order), with no negative position on a valid slot; ``valid`` is a
    bool mask ``[B, T]`` or ``[B, H, T]``; ``keys``, ``values`` and ``queries`` are finite everywhere,
    padding included (a NaN or inf is reported with its row, head and token, e.g. ``values contain
    NaN at row 0, head 1, token 5``). These checks cost one pass over the inputs; the attention
    path of :func:`kvframe.attach` does not run them.
    """
    state, ctx = compression_inputs(
        compressor, keys, values, queries, positions=positions, valid=valid, log_weights=log_weights,
        layer_idx=layer_idx, num_layers=num_layers, scaling=scaling, stats=stats, step=step,
    )
    out = compressor.compress(state, ctx)
    return CompressResult(out.keys, out.values, out.positions, out.log_weights, out.valid, out)
