"""Triton kernel of ``kvframe::group_reduce`` (see :mod:`kvframe.kernels.compact`). Imports triton.

Design: grid ``(B·H, ceil(T / BLOCK_T))``; a program loads ``BLOCK_T`` consecutive slots of one
``(b, h)`` row (their ``assign``, ``w`` and values, the latter in chunks of ``BLOCK_D`` columns),
forms ``float32(v_i) * w_i`` and adds it, ``w_i`` and ``1`` into the outputs of the kept slot
``assign_i`` with atomic adds (members with ``assign_i = -1`` or ``>= S`` are masked out). Every
input element is read once and every member causes ``Dv + 2`` atomics; the outputs start at zero,
so a single-member group is exact. Because float atomics from different programs (and lanes) land
in an unspecified order, a multi-member group's float sums are reproducible only up to rounding on
GPU; counts (int32 atomics, returned as int64) are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _group_reduce_kernel(
    v_ptr,  # [B*H, T, DV] any float, contiguous
    w_ptr,  # [B*H, T] f32
    a_ptr,  # [B*H, T] int64
    vsum_ptr,  # [B*H, S, DV] f32, zeroed
    wsum_ptr,  # [B*H, S] f32, zeroed
    cnt_ptr,  # [B*H, S] int32, zeroed
    T,
    S,
    DV,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    rows = bh * T + offs_t  # int64
    a = tl.load(a_ptr + rows, mask=in_t, other=-1)
    member = in_t & (a >= 0) & (a < S)
    out = bh * S + tl.where(member, a, 0)  # int64 row of the kept slot
    w = tl.load(w_ptr + rows, mask=member, other=0.0)
    tl.atomic_add(wsum_ptr + out, w, mask=member)
    tl.atomic_add(cnt_ptr + out, tl.full([BLOCK_T], 1, tl.int32), mask=member)
    for d0 in range(0, DV, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m2 = member[:, None] & (offs_d < DV)[None, :]
        v = tl.load(v_ptr + rows[:, None] * DV + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.atomic_add(vsum_ptr + out[:, None] * DV + offs_d[None, :], v * w[:, None], mask=m2)


def group_reduce_triton(
    values: Tensor, weights: Tensor, assign: Tensor, num_kept: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch :func:`_group_reduce_kernel`; same contract as ``kvframe::group_reduce``."""
    b, h, t, dv = values.shape
    s = int(num_kept)
    dev = values.device
    vsum = torch.zeros(b, h, s, dv, dtype=torch.float32, device=dev)
    wsum = torch.zeros(b, h, s, dtype=torch.float32, device=dev)
    cnt = torch.zeros(b, h, s, dtype=torch.int32, device=dev)
    if b * h * t == 0 or s == 0:
        return vsum, wsum, cnt.long()
    v = values.contiguous()
    w = weights.float().contiguous()
    a = assign.long().contiguous()
    block_t = min(64, triton.next_power_of_2(t))
    block_d = min(128, triton.next_power_of_2(max(dv, 1)))
    grid = (b * h, triton.cdiv(t, block_t))
    _group_reduce_kernel[grid](v, w, a, vsum, wsum, cnt, t, s, dv, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return vsum, wsum, cnt.long()
