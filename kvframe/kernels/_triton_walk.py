"""Triton kernel of ``kvframe::balance_signs`` (see :mod:`kvframe.kernels.walk`). Imports triton.

Design: grid ``(G·nb,)``, one program per block. The program loads the block's keys ``[n, d]`` and
values ``[n, dv]`` once (padded to powers of two), converts them to float32, centres the keys by the
mean over the valid entries, and keeps them in registers. It then walks ``i = 0..n-1``
sequentially, carrying ``acc[a] = sum_{b decided} Ker_ab s_b`` ``[n]`` in registers: at step ``i`` it
reads ``acc_i``, decides ``s_i`` (``s_0 = +1`` by giving ``u_0`` the value -1), computes kernel row
``i`` on the fly from the centred key and the value of entry ``i`` (re-read from memory, centred the
same way: ``n·(d + dv)`` multiply-adds) and adds ``Ker_i· s_i`` into ``acc``. The ``n × n`` kernel
matrix never exists; work is ``O(n² (d + dv))`` per block, memory ``O(n (d + dv))``.

Order of float operations follows the torch reference (``temp * dot``, ``/ sqrt(d)``, ``- beta``,
clamp at 60, ``exp``, ``* ((vv + const) + 1e-8)``, ``* valid_a * valid_i``); only the summation order
of the dot products and of the key mean differ, so kernel entries agree to a few ulp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvframe.kernels.walk import MAX_EXPONENT


@triton.jit
def _balance_signs_kernel(
    k_ptr,  # [P, N, D] any float, contiguous
    v_ptr,  # [P, N, DV] any float, contiguous
    valid_ptr,  # [P, N] uint8
    u_ptr,  # [P, N] f32
    out_ptr,  # [P, N] f32
    N,
    D,
    DV,
    gamma,
    temp,
    sqrt_d,
    beta,
    const,
    max_exp,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    in_n = offs_n < N
    in_d = offs_d < D
    in_e = offs_e < DV
    rows = base + offs_n

    vm = (tl.load(valid_ptr + rows, mask=in_n, other=0) != 0).to(tl.float32)
    k_mask = in_n[:, None] & in_d[None, :]
    v_mask = in_n[:, None] & in_e[None, :]
    k = tl.load(k_ptr + rows[:, None] * D + offs_d[None, :], mask=k_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + rows[:, None] * DV + offs_e[None, :], mask=v_mask, other=0.0).to(tl.float32)
    mean = tl.sum(k * vm[:, None], axis=0) / tl.maximum(tl.sum(vm, axis=0), 1.0)
    kc = k - mean[None, :]
    u = tl.load(u_ptr + rows, mask=in_n, other=1.0)
    u = tl.where(offs_n == 0, -1.0, u)  # forces s_0 = +1 (acc is 0 then, so p_0 = 1/2)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    signs = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, N):
        sel = offs_n == i
        acc_i = tl.sum(tl.where(sel, acc, 0.0), axis=0)
        u_i = tl.sum(tl.where(sel, u, 0.0), axis=0)
        valid_i = tl.sum(tl.where(sel, vm, 0.0), axis=0)
        p = 0.5 - gamma * acc_i
        s = tl.where(u_i < p, 1.0, -1.0)
        signs = tl.where(sel, s, signs)
        # kernel row i on the fly (Ker is symmetric: row i = column i)
        k_i = tl.load(k_ptr + (base + i) * D + offs_d, mask=in_d, other=0.0).to(tl.float32) - mean
        v_i = tl.load(v_ptr + (base + i) * DV + offs_e, mask=in_e, other=0.0).to(tl.float32)
        dots = tl.sum(kc * k_i[None, :], axis=1)
        vv = tl.sum(v * v_i[None, :], axis=1)
        logits = tl.minimum(temp * dots / sqrt_d - beta, max_exp)
        ker = tl.exp(logits) * (vv + const + 1e-8) * vm * valid_i
        acc += ker * s
    tl.store(out_ptr + rows, signs * vm, mask=in_n)


def balance_signs_triton(
    keys: Tensor, values: Tensor, valid: Tensor, u: Tensor, gamma: float, temp: float, beta: float, const: float
) -> Tensor:
    """Launch :func:`_balance_signs_kernel`; same contract as ``kvframe::balance_signs``."""
    g, nb, n, d = keys.shape
    dv = values.shape[-1]
    out = torch.zeros(g, nb, n, dtype=torch.float32, device=keys.device)
    if g * nb * n == 0:
        return out
    block_n = triton.next_power_of_2(n)
    block_d = triton.next_power_of_2(max(d, 1))
    block_dv = triton.next_power_of_2(max(dv, 1))
    tile = block_n * (block_d + block_dv)  # float32 elements held in registers per program
    num_warps = 4 if tile <= 16384 else (8 if tile <= 32768 else 16)
    _balance_signs_kernel[(g * nb,)](
        keys.contiguous(),
        values.contiguous(),
        valid.to(torch.uint8).contiguous(),
        u.float().contiguous(),
        out,
        n,
        d,
        dv,
        float(gamma),
        float(temp),
        math.sqrt(d),
        float(beta),
        float(const),
        MAX_EXPONENT,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=num_warps,
    )
    return out
