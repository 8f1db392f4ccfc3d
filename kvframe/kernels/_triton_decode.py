"""Triton kernel of ``kvframe::slot_decode_attention`` (flash-decoding over weighted, ragged slots).

Imported only when the op runs its Triton path (``kvframe.kernels.decode`` imports it lazily), so
kvframe itself imports without triton.

Grid ``(B * H_kv, row tiles, splits of S)``. A program takes the ``G * q`` query rows of one KV head
(row ``r = g * q + i`` is query head ``h * G + g``, query ``i``; padded to ``BLOCK_R >= 16`` rows so
``tl.dot`` applies), streams its share of the slots in ``BLOCK_S`` blocks and keeps the online
softmax ``(m, l, acc)`` in fp32. Logits are ``scale * q.k + log_weight``; a slot is visible to a
row iff ``valid & pos <= qpos [& qpos - pos < window]``. A row that saw no visible slot in the
program's range is recomputed over every slot of the range ("attend to everything"); a flag says
which of the two the program's partial result is, and the combine step uses the visible partials
of a row if any split has one, else the attend-to-everything partials, which is exactly the torch
reference's rule (``visible | ~visible.any(-1)``). With one split the program writes the output
directly; with several it writes fp32 partials that :func:`_combine` merges in torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvframe.kernels import interpreting
from kvframe.kernels._triton_common import load_query_rows, logits_tile, online_softmax_step


@triton.jit
def _decode_kernel(
    Q, K, V, LW, POS, VALID, QPOS, OUT, ACC, ML, FLAG,
    sqb, sqh, sqi, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    swb, swh, sws,
    spb, sph, sps,
    smb, smh, sms,
    sqpb, sqph, sqpi,
    sob, soh, soi, sod,
    H, G, NQ, S, D, DV, S_PER_SPLIT, NSPLIT, scale, window,
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

    s_start = pid_s * S_PER_SPLIT
    s_end = tl.minimum(s_start + S_PER_SPLIT, S)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    w_base = LW + b * swb + h * swh
    p_base = POS + b * spb + h * sph
    m_base = VALID + b * smb + h * smh

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < s_end
        logits = logits_tile(
            q, k_base, w_base, p_base, m_base, qp, offs_s, s_ok, offs_d, d_ok,
            sks, skd, sws, sps, sms, scale, window, HAS_WINDOW, F32_DOT, False,
        )
        m_i, l_i, acc = online_softmax_step(logits, m_i, l_i, acc, v_base, offs_s, s_ok, offs_dv, dv_ok, svs, svd, F32_DOT)

    # rows that saw nothing in this range: the same range again, every slot visible
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
                sks, skd, sws, sps, sms, scale, window, HAS_WINDOW, F32_DOT, True,
            )
            m2, l2, acc2 = online_softmax_step(logits, m2, l2, acc2, v_base, offs_s, s_ok, offs_dv, dv_ok, svs, svd, F32_DOT)
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
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            OUT + b * sob + (h * G + g)[:, None] * soh + i[:, None] * soi + offs_dv[None, :] * sod,
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & dv_ok[None, :],
        )


def _combine(acc: Tensor, ml: Tensor, flag: Tensor) -> Tensor:
    """Merge split partials ``acc [BH, NS, R, Dv]``, ``ml [BH, NS, R, 2]``, ``flag [BH, NS, R]``.

    A row uses the splits that saw a visible slot when any did, else every split's
    attend-to-everything partial."""
    seen = flag.bool()
    use = seen | ~seen.any(dim=1, keepdim=True)
    m = ml[..., 0].masked_fill(~use, float("-inf"))
    m_max = m.max(dim=1, keepdim=True).values
    m_max = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    scale = torch.exp(m - m_max)  # 0 for unused splits and splits without slots
    num = (acc * scale[..., None]).sum(dim=1)
    den = (ml[..., 1] * scale).sum(dim=1)
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def _default_splits(bh: int, s: int, block_s: int, device: torch.device) -> int:
    """Split S when B*H_kv programs alone would leave most of the GPU idle (flash-decoding)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = triton.cdiv(s, block_s)
    want = triton.cdiv(2 * sms, max(1, bh))
    return max(1, min(want, blocks // 4 if blocks >= 8 else 1, 64))


def slot_decode_attention_triton(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    scaling: float | None,
    sliding_window: int | None,
    num_splits: int | None = None,
    block_s: int = 64,
) -> Tensor:
    """Launch :func:`_decode_kernel`; shapes as in :func:`kvframe.kernels.decode.slot_decode_attention`."""
    b, hq, nq, d = query.shape
    h, s, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    g = hq // h
    out = torch.empty((b, hq, nq, dv), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    if s == 0:
        return out.zero_()
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    # fp32 inputs (or mixed dtypes): fp32 dots at IEEE precision (no TF32), matching the reference;
    # 16-bit inputs: native tensor-core dots with fp32 accumulation. Triton's CPU interpreter gets
    # 16-bit dots wrong (it returns garbage for bf16 operands), so under it tiles are upcast to fp32.
    f32 = interpreting() or not (query.dtype == keys.dtype == values.dtype and query.dtype in (torch.float16, torch.bfloat16))
    lw = log_weights.float()
    valid_u8 = valid.view(torch.uint8)
    qpos = query_positions.to(torch.int64)
    qstr = (qpos.stride(0), 0, qpos.stride(1)) if qpos.dim() == 2 else (qpos.stride(0), qpos.stride(1), qpos.stride(2))
    nrows = g * nq
    block_r = min(_pow2(nrows), 64)
    n_rt = triton.cdiv(nrows, block_r)
    splits = num_splits if num_splits is not None else _default_splits(b * h, s, block_s, query.device)
    s_per_split = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    splits = triton.cdiv(s, s_per_split)
    split = splits > 1
    if split:
        acc = torch.empty((b * h, splits, nrows, dv), dtype=torch.float32, device=query.device)
        ml = torch.empty((b * h, splits, nrows, 2), dtype=torch.float32, device=query.device)
        flag = torch.empty((b * h, splits, nrows), dtype=torch.int8, device=query.device)
    else:
        acc = ml = flag = out  # unused
    hstride = lambda t: t.stride(1) if t.shape[1] > 1 else 0  # noqa: E731  ([B, 1, S] is shared by all heads)
    grid = (b * h, n_rt, splits)
    _decode_kernel[grid](
        query, keys, values, lw, positions, valid_u8, qpos, out, acc, ml, flag,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3),
        lw.stride(0), hstride(lw), lw.stride(2),
        positions.stride(0), hstride(positions), positions.stride(2),
        valid_u8.stride(0), hstride(valid_u8), valid_u8.stride(2),
        *qstr,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        h, g, nq, s, d, dv, s_per_split, splits, scale, int(sliding_window) if sliding_window is not None else 0,
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
