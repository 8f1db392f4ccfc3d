"""Triton kernel of ``kvframe::slot_decode_attention_packed`` (flash-decoding over packed segments).

Imported only when the op runs its Triton path (``kvframe.kernels.packed`` imports it lazily), so
kvframe itself imports without triton.

Grid ``(B * H_kv, row tiles, splits)``, rows as in ``_triton_decode`` (row ``r = g * q + i`` is
query head ``h * G + g``, query ``i``, padded to ``BLOCK_R >= 16``). A program reads its head's
``start`` and ``length`` and handles slots ``[split * chunk, (split + 1) * chunk)`` of that head's
segment, ``chunk = ceil(length / splits)`` rounded up to ``BLOCK_S``; entries outside the segment
are never read (masked loads), so free capacity may hold anything. The online softmax, the
"attend to everything" recomputation of rows that saw nothing (over the head's own slots only),
the per-split flag and the log-sum-exp combine are those of the dense kernel; a head of length 0
gives zeros. Splits are sized per head inside the kernel, so the launch needs no ``length.max()``
(no host synchronization).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvframe.kernels import interpreting
from kvframe.kernels._triton_common import load_query_rows, logits_tile, online_softmax_step
from kvframe.kernels._triton_decode import _combine, _default_splits, _pow2


@triton.jit
def _packed_decode_kernel(
    Q, K, V, LW, POS, VALID, START, LENGTH, QPOS, OUT, ACC, ML, FLAG,
    sqb, sqh, sqi, sqd,
    skn, skd,
    svn, svd,
    swn, spn, smn,
    sstb, ssth,
    slnb, slnh,
    sqpb, sqph, sqpi,
    sob, soh, soi, sod,
    H, G, NQ, D, DV, NSPLIT, scale, window,
    HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    nrows = G * NQ
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < nrows
    g = (rows // NQ).to(tl.int64)
    i = (rows % NQ).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = load_query_rows(Q, b, h, G, g, i, offs_d, d_ok, row_ok, sqb, sqh, sqi, sqd, F32_DOT)
    qp = tl.load(QPOS + b * sqpb + h * sqph + i * sqpi, mask=row_ok, other=0)

    seg = tl.load(START + b * sstb + h * ssth).to(tl.int64)
    n = tl.load(LENGTH + b * slnb + h * slnh).to(tl.int64)
    chunk = (n + NSPLIT - 1) // NSPLIT
    chunk = (chunk + BLOCK_S - 1) // BLOCK_S * BLOCK_S
    s_start = pid_s * chunk
    s_end = tl.minimum(s_start + chunk, n)
    # the head's slot s is entry seg + s
    k_base = K + seg * skn
    v_base = V + seg * svn
    w_base = LW + seg * swn
    p_base = POS + seg * spn
    m_base = VALID + seg * smn

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < s_end
        logits = logits_tile(
            q, k_base, w_base, p_base, m_base, qp, offs_s, s_ok, offs_d, d_ok,
            skn, skd, swn, spn, smn, scale, window, HAS_WINDOW, F32_DOT, False,
        )
        m_i, l_i, acc = online_softmax_step(logits, m_i, l_i, acc, v_base, offs_s, s_ok, offs_dv, dv_ok, svn, svd, F32_DOT)

    # rows that saw nothing in this range: the same range again, every slot of the segment visible
    seen = l_i > 0
    need = tl.sum((row_ok & ~seen).to(tl.int32), axis=0) > 0
    m2 = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l2 = tl.zeros([BLOCK_R], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    if need:
        for s0 in range(s_start, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < s_end
            logits = logits_tile(
                q, k_base, w_base, p_base, m_base, qp, offs_s, s_ok, offs_d, d_ok,
                skn, skd, swn, spn, smn, scale, window, HAS_WINDOW, F32_DOT, True,
            )
            m2, l2, acc2 = online_softmax_step(logits, m2, l2, acc2, v_base, offs_s, s_ok, offs_dv, dv_ok, svn, svd, F32_DOT)
    m_i = tl.where(seen, m_i, m2)
    l_i = tl.where(seen, l_i, l2)
    acc = tl.where(seen[:, None], acc, acc2)

    if SPLIT:
        # partials [B*H, NSPLIT, G*q, (Dv | 2)], flag [B*H, NSPLIT, G*q]
        base = (pid_bh * NSPLIT + pid_s).to(tl.int64) * nrows
        tl.store(ACC + (base + rows)[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(ML + (base + rows) * 2, m_i, mask=row_ok)
        tl.store(ML + (base + rows) * 2 + 1, l_i, mask=row_ok)
        tl.store(FLAG + base + rows, seen.to(tl.int8), mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a head of length 0: acc = 0, so zeros
        tl.store(
            OUT + b * sob + (h * G + g)[:, None] * soh + i[:, None] * soi + offs_dv[None, :] * sod,
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & dv_ok[None, :],
        )


def slot_decode_attention_packed_triton(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    start: Tensor,
    length: Tensor,
    query_positions: Tensor,
    scaling: float | None,
    sliding_window: int | None,
    num_splits: int | None = None,
    block_s: int = 64,
) -> Tensor:
    """Launch :func:`_packed_decode_kernel`; shapes as in :func:`kvframe.kernels.packed.slot_decode_attention_packed`.

    ``num_splits`` defaults to the dense kernel's heuristic applied to the mean segment capacity
    ``N / (B * H)`` (1 on CPU)."""
    b, hq, nq, d = query.shape
    h = start.shape[1]
    n, dv = keys.shape[0], values.shape[-1]
    g = hq // h
    out = torch.empty((b, hq, nq, dv), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    if n == 0:
        return out.zero_()
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    # as in the dense kernel: IEEE fp32 dots for fp32 or mixed inputs and under the interpreter
    # (which gets 16-bit dots wrong), native 16-bit dots with fp32 accumulation otherwise
    f32 = interpreting() or not (query.dtype == keys.dtype == values.dtype and query.dtype in (torch.float16, torch.bfloat16))
    lw = log_weights.float()
    pos = positions.to(torch.int64)
    valid_u8 = valid.view(torch.uint8)
    start = start.to(torch.int64)
    length = length.to(torch.int64)
    qpos = query_positions.to(torch.int64)
    qstr = (qpos.stride(0), 0, qpos.stride(1)) if qpos.dim() == 2 else (qpos.stride(0), qpos.stride(1), qpos.stride(2))
    nrows = g * nq
    block_r = min(_pow2(nrows), 64)
    n_rt = triton.cdiv(nrows, block_r)
    splits = num_splits if num_splits is not None else _default_splits(b * h, n // (b * h), block_s, query.device)
    splits = max(1, int(splits))
    split = splits > 1
    if split:
        acc = torch.empty((b * h, splits, nrows, dv), dtype=torch.float32, device=query.device)
        ml = torch.empty((b * h, splits, nrows, 2), dtype=torch.float32, device=query.device)
        flag = torch.empty((b * h, splits, nrows), dtype=torch.int8, device=query.device)
    else:
        acc = ml = flag = out  # unused
    grid = (b * h, n_rt, splits)
    _packed_decode_kernel[grid](
        query, keys, values, lw, pos, valid_u8, start, length, qpos, out, acc, ml, flag,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1),
        lw.stride(0), pos.stride(0), valid_u8.stride(0),
        start.stride(0), start.stride(1),
        length.stride(0), length.stride(1),
        *qstr,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        h, g, nq, d, dv, splits, scale, int(sliding_window) if sliding_window is not None else 0,
        HAS_WINDOW=sliding_window is not None,
        SPLIT=split,
        F32_DOT=f32,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
        BLOCK_D=_pow2(d),
        BLOCK_DV=_pow2(dv),
    )
    if split:
        res = _combine(acc, ml, flag)  # [B*H, G*q, Dv]
        out.copy_(res.reshape(b, h, g, nq, dv).reshape(b, hq, nq, dv))
    return out
