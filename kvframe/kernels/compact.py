"""``kvframe::group_reduce``: compaction with merge, one pass over the cache.

A compression keeps ``S`` slots and folds dropped slots into kept ones. ``assign`` ``[B, H, T]``
(int64) maps every input slot ``i`` to the kept slot ``assign_i`` in ``0..S-1`` whose *group* it
joins, or ``-1`` for a slot that is dropped outright (see :mod:`kvframe.policies.groups`). For every
kept slot ``j`` the op returns, in one pass over the input,

* ``vsum[b, h, j, :] = sum_{i: assign_i = j} w_i * v_i``   ``[B, H, S, Dv]`` float32,
* ``wsum[b, h, j]    = sum_{i: assign_i = j} w_i``         ``[B, H, S]`` float32,
* ``count[b, h, j]   = #{i: assign_i = j}``                ``[B, H, S]`` int64 (members, whatever their weight),

from ``values`` ``[B, H, T, Dv]`` (any float dtype; products are formed in float32 as
``float32(v_i) * w_i``), ``weights`` ``[B, H, T]`` float32 and ``assign``. Slots with ``assign = -1``
contribute nothing (their values and weights may be anything, NaN included). An empty group gives
zeros. A group with a single member ``i`` gives exactly ``float32(v_i) * w_i`` and ``w_i`` (bit for
bit, on every backend), which is what lets merge policies leave untouched slots' bits alone.

Backends (:func:`kvframe.kernels.use_triton`): the torch reference is ``scatter_add`` (the same
sums :func:`kvframe.policies.groups.group_sum` computes, bit for bit); the Triton kernel
(:mod:`kvframe.kernels._triton_compact`) runs one program per ``(b·h, block of T)`` and adds into
the outputs with atomics. Float atomics make the order of a multi-member group's summation, hence
its last bits, nondeterministic on GPU (single-member groups are exact); counts are exact.
Precondition: ``assign < S`` (the reference raises on an out-of-range index; the Triton kernel
ignores it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvframe.kernels import use_triton


def group_reduce_reference(
    values: Tensor, weights: Tensor, assign: Tensor, num_kept: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Torch reference of ``kvframe::group_reduce`` (``scatter_add`` into ``S + 1`` columns, the last
    collecting the dropped slots, then cut off)."""
    b, h, t = assign.shape
    dv = values.shape[-1]
    weights = weights.float()
    idx = torch.where(assign >= 0, assign, num_kept)
    x = values.float() * weights[..., None]
    vsum = x.new_zeros(b, h, num_kept + 1, dv)
    vsum.scatter_add_(2, idx[..., None].expand(b, h, t, dv), x)
    wsum = weights.new_zeros(b, h, num_kept + 1)
    wsum.scatter_add_(2, idx, weights)
    count = torch.zeros(b, h, num_kept + 1, dtype=torch.long, device=assign.device)
    count.scatter_add_(2, idx, (assign >= 0).long())
    return (
        vsum[:, :, :num_kept].contiguous(),
        wsum[:, :, :num_kept].contiguous(),
        count[:, :, :num_kept].contiguous(),
    )


@torch.library.custom_op("kvframe::group_reduce", mutates_args=())
def group_reduce_op(values: Tensor, weights: Tensor, assign: Tensor, num_kept: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(vsum, wsum, count)`` of every group, see the module docstring (layouts there)."""
    if use_triton(values):
        from kvframe.kernels import _triton_compact

        return _triton_compact.group_reduce_triton(values, weights, assign, num_kept)
    return group_reduce_reference(values, weights, assign, num_kept)


@group_reduce_op.register_fake
def _group_reduce_fake(values: Tensor, weights: Tensor, assign: Tensor, num_kept: int) -> tuple[Tensor, Tensor, Tensor]:
    b, h, _, dv = values.shape
    return (
        values.new_empty((b, h, num_kept, dv), dtype=torch.float32),
        values.new_empty((b, h, num_kept), dtype=torch.float32),
        values.new_empty((b, h, num_kept), dtype=torch.long),
    )


def group_reduce(values: Tensor, weights: Tensor, assign: Tensor, num_kept: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(vsum [B,H,S,Dv] f32, wsum [B,H,S] f32, count [B,H,S] int64)`` of ``kvframe::group_reduce``:
    ``vsum_j = sum_{assign_i=j} w_i v_i``, ``wsum_j = sum_{assign_i=j} w_i``, ``count_j = #{assign_i=j}``.

    ``values`` ``[B, H, T, Dv]`` (any float dtype), ``weights`` ``[B, H, T]`` (cast to float32),
    ``assign`` ``[B, H, T]`` (cast to int64; ``-1`` = dropped), ``num_kept`` = ``S``.
    """
    if values.dim() != 4 or assign.dim() != 3 or values.shape[:3] != assign.shape or weights.shape != assign.shape:
        raise ValueError(
            f"group_reduce: values [B,H,T,Dv], weights and assign [B,H,T]; got {tuple(values.shape)}, "
            f"{tuple(weights.shape)}, {tuple(assign.shape)}"
        )
    if not values.is_floating_point():
        raise ValueError(f"group_reduce: values must be floating point, got {values.dtype}")
    return group_reduce_op(values, weights.float(), assign.long(), int(num_kept))
