"""``kvframe::slot_decode_attention_packed``: decode attention over a packed, ragged slot layout.

The same attention as ``kvframe::slot_decode_attention`` (:mod:`kvframe.kernels.decode`), but a
layer's slots are one flat buffer shared by all rows and heads instead of a padded ``[B, H, S]``
grid, so a head that keeps few slots costs no padding. For query head ``j`` (KV head
``h = j // G``, ``G = H_q / H_kv``), query ``i`` and slot ``s < length[b, h]``, stored at entry
``n = start[b, h] + s``::

    logit[j, i, s] = scaling * <query[b, j, i], keys[n]> + log_weights[n]
    visible[j, i, s] = valid[n] and positions[n] <= qpos[i]
                       and (no window or qpos[i] - positions[n] < sliding_window)
    out[b, j, i] = sum_s softmax_s(logit[j, i, :] over visible s) * values[n]

A row with no visible slot attends to every one of its head's ``length[b, h]`` slots instead (the
dense op's rule: finite output, which the caller ignores); a head with ``length == 0`` gives zeros.
``scaling`` defaults to ``1/sqrt(D)``.

Layout: ``keys [N, D]``, ``values [N, Dv]`` (one float dtype), ``log_weights [N]`` float,
``positions [N]`` int64, ``valid [N]`` bool; ``start [B, H]``, ``length [B, H]`` int64, head
``(b, h)`` owning entries ``start[b, h] .. start[b, h] + length[b, h] - 1``. Segments do not
overlap; entries outside every segment (free capacity) may hold anything, NaN or uninitialized
memory included, and never reach the output: the Triton kernel does not read them, the torch
reference masks them with ``torch.where``. ``query [B, H_q, q, D]`` (output ``[B, H_q, q, Dv]`` in
its dtype), ``qpos [B, q]`` or ``[B, H, q]`` int64.

The torch reference (:func:`slot_attention_packed_reference`) unpacks the layer into the padded
dense layout (:func:`unpack`) and runs :func:`~kvframe.kernels.decode.slot_attention_reference`;
padding slots get log-weight ``-inf``, so a row that sees nothing attends to its head's own slots
only, as the packed rule says. The Triton kernel (``_triton_packed_decode``) is flash-decoding over
each head's own segment. :func:`pack_dense` builds the packed layout from a dense state.
"""

from typing import Optional

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.kernels import norm_window, use_triton
from kvframe.kernels.decode import TRITON_DTYPES, slot_attention_reference
from kvframe.slots import INVALID_POSITION

#: ``(keys, values, log_weights, positions, valid, start, length)``, in the op's argument order.
Packed = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def pack_dense(
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    capacity_extra: int = 0,
    gap_fill: float = 0.0,
) -> Packed:
    """Pack a dense state (``keys [B, H, S, D]``, ``values [B, H, S, Dv]``, ``log_weights``,
    ``positions``, ``valid`` ``[B, H, S]`` or ``[B, 1, S]``) into the packed layout.

    Each head keeps its valid slots, in slot order (``length`` = its valid count); heads follow
    each other row-major, each segment followed by ``capacity_extra`` free entries whose keys,
    values and log-weights are ``gap_fill`` (positions :data:`~kvframe.slots.INVALID_POSITION`,
    valid ``False``). Returns ``(keys, values, log_weights, positions, valid, start, length)``."""
    b, h, s = keys.shape[:3]
    valid = valid.bool().expand(b, h, s)
    length = valid.sum(-1)  # [B, H] int64
    cap = (length + capacity_extra).flatten()
    start = (cap.cumsum(0) - cap).view(b, h)
    n = int(cap.sum())
    dest = (start[..., None] + valid.long().cumsum(-1) - 1)[valid]  # packed entry of each valid slot
    dev = keys.device
    k = keys.new_full((n, keys.shape[-1]), gap_fill)
    v = values.new_full((n, values.shape[-1]), gap_fill)
    lw = torch.full((n,), gap_fill, dtype=log_weights.dtype, device=dev)
    pos = torch.full((n,), INVALID_POSITION, dtype=torch.long, device=dev)
    ok = torch.zeros(n, dtype=torch.bool, device=dev)
    k[dest] = keys[valid]
    v[dest] = values[valid]
    lw[dest] = log_weights.expand(b, h, s)[valid]
    pos[dest] = positions.expand(b, h, s)[valid].long()
    ok[dest] = True
    return k, v, lw, pos, ok, start, length


def unpack(
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    start: Tensor,
    length: Tensor,
    slots: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The padded dense layout of a packed layer: ``(keys [B, H, S, D], values [B, H, S, Dv],
    log_weights, positions, valid [B, H, S])`` with ``S = slots`` or the longest head.

    Slot ``s`` of head ``(b, h)`` is entry ``start[b, h] + s`` for ``s < length[b, h]``; the padding
    after it has zero keys and values, log-weight ``-inf`` (weight 0), position
    :data:`~kvframe.slots.INVALID_POSITION` and valid ``False``. Gap entries are never selected
    (``torch.where``, so NaN there does not leak). Allocates one padded copy of the layer."""
    s = slots if slots is not None else (int(length.max()) if length.numel() else 0)
    if keys.shape[0] == 0:  # an empty layer: gather from one dummy entry, masked out below
        keys, values, log_weights, positions, valid = (
            t.new_zeros((1, *t.shape[1:])) for t in (keys, values, log_weights, positions, valid)
        )
    ar = torch.arange(s, device=start.device)
    inside = ar < length[..., None]  # [B, H, S]
    idx = torch.where(inside, start[..., None] + ar, 0)
    k = torch.where(inside[..., None], keys[idx], 0.0)
    v = torch.where(inside[..., None], values[idx], 0.0)
    lw = torch.where(inside, log_weights[idx], float("-inf"))
    pos = torch.where(inside, positions[idx], INVALID_POSITION)
    ok = torch.where(inside, valid[idx], False)
    return k, v, lw, pos, ok


def slot_attention_packed_reference(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    start: Tensor,
    length: Tensor,
    query_positions: Tensor,
    scaling: Optional[float],
    sliding_window: Optional[int],
) -> Tensor:
    """The torch reference of the packed op: :func:`unpack`, then the dense
    :func:`~kvframe.kernels.decode.slot_attention_reference`. Returns ``[B, H_q, q, Dv]``.

    Its transient memory is one layer's padded copy (``[B, H, max(length), D + Dv]`` plus the
    per-slot fields), what the dense layout would have held."""
    b, hq, q, _ = query.shape
    h = start.shape[1]
    k, v, lw, pos, ok = unpack(keys, values, log_weights, positions, valid, start, length)
    if k.shape[2] == 0:
        return query.new_zeros((b, hq, q, values.shape[-1]))
    out = slot_attention_reference(
        query, k.to(query.dtype), v.to(query.dtype), lw, pos, ok, query_positions, scaling, sliding_window
    )
    empty = (length == 0).repeat_interleave(hq // h, dim=1)[:, :, None, None]  # [B, H_q, 1, 1]
    return torch.where(empty, 0.0, out)


@torch.library.custom_op("kvframe::slot_decode_attention_packed", mutates_args=())
def slot_decode_attention_packed_op(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    start: Tensor,
    length: Tensor,
    query_positions: Tensor,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> Tensor:
    """``kvframe::slot_decode_attention_packed`` (see the module docstring): Triton or the torch reference."""
    if use_triton(query) and {query.dtype, keys.dtype, values.dtype} <= set(TRITON_DTYPES):
        from kvframe.kernels import _triton_packed_decode

        return _triton_packed_decode.slot_decode_attention_packed_triton(
            query, keys, values, log_weights, positions, valid, start, length, query_positions, scaling,
            norm_window(sliding_window),
        )
    return slot_attention_packed_reference(
        query, keys, values, log_weights, positions, valid, start, length, query_positions, scaling, sliding_window
    )


@slot_decode_attention_packed_op.register_fake
def _slot_decode_attention_packed_fake(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    start: Tensor,
    length: Tensor,
    query_positions: Tensor,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> Tensor:
    b, hq, q, _ = query.shape
    return query.new_empty((b, hq, q, values.shape[-1]))


def slot_decode_attention_packed(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    start: Tensor,
    length: Tensor,
    query_positions: Tensor,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> Tensor:
    """Attention of ``query [B, H_q, q, D]`` over a packed layer; returns ``[B, H_q, q, Dv]``.

    See the module docstring for the formula and layout. Runs the op
    ``kvframe::slot_decode_attention_packed`` (Triton for CUDA tensors under the default backend,
    the torch reference otherwise). Shapes and dtypes are checked here; that segments lie inside
    ``N`` and do not overlap is the caller's contract (checking it would synchronize). The op has no
    autograd formula: call it on tensors that do not require grad."""
    name = "slot_decode_attention_packed"
    if query.dim() != 4 or keys.dim() != 2 or values.dim() != 2:
        raise ConfigError(
            f"{name} expects query [B, Hq, q, D], keys [N, D], values [N, Dv]; got "
            f"{tuple(query.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    b, hq, q, d = query.shape
    n = keys.shape[0]
    if keys.shape[1] != d or values.shape[0] != n:
        raise ConfigError(
            f"{name}: query {tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)} do not fit "
            "(keys must be [N, D] with the query's head dim, values [N, Dv] with the same N)"
        )
    if not (query.is_floating_point() and keys.is_floating_point()) or values.dtype != keys.dtype:
        raise ConfigError(
            f"{name}: query, keys and values must be floating point, keys and values of one dtype; got "
            f"{query.dtype}, {keys.dtype}, {values.dtype}"
        )
    fields = (
        ("log_weights", log_weights, "float", log_weights.is_floating_point()),
        ("positions", positions, "int64", positions.dtype == torch.int64),
        ("valid", valid, "bool", valid.dtype == torch.bool),
    )
    for field, t, kind, ok in fields:
        if tuple(t.shape) != (n,):
            raise ConfigError(f"{name}: {field} must be [N] = [{n}] like keys; got {tuple(t.shape)}")
        if not ok:
            raise ConfigError(f"{name}: {field} must be {kind}; got {t.dtype}")
    h = start.shape[1] if start.dim() == 2 else 0
    if start.dim() != 2 or length.shape != start.shape or start.shape[0] != b or h == 0 or hq % h:
        raise ConfigError(
            f"{name}: start and length must be [B, H] with B = {b} and H dividing the {hq} query heads; "
            f"got {tuple(start.shape)}, {tuple(length.shape)}"
        )
    for field, t in (("start", start), ("length", length), ("query positions", query_positions)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ConfigError(f"{name}: {field} must be an integer tensor (int64); got {t.dtype}")
    if query_positions.shape not in ((b, q), (b, h, q)):
        raise ConfigError(
            f"{name}: query positions must be [B, q] = [{b}, {q}] or [B, H, q] = [{b}, {h}, {q}]; got {tuple(query_positions.shape)}"
        )
    return slot_decode_attention_packed_op(
        query, keys, values, log_weights, positions, valid, start.long(), length.long(), query_positions.long(),
        scaling, norm_window(sliding_window),
    )
