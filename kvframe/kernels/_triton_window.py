"""Triton kernels of ``kvframe::window_scores`` (observation-window scoring, two passes).

Imported only when the op runs its Triton path (``kvframe.kernels.window`` imports it lazily), so
kvframe itself imports without triton.

Rows: the ``G * w`` (query head, window query) pairs of one KV head, row ``r = g * w + i`` being
query head ``h * G + g`` and window query ``i``; tiles of ``BLOCK_R >= 16`` rows (``tl.dot``).
Logits ``scale * q.k + log_weight``, visible iff ``valid & pos <= qpos [& qpos - pos < window]``.

* pass 1, grid ``(B * H_kv, row tiles)``: per row, the log-sum-exp of its visible logits over all
  ``T`` slots (online max / sum over ``BLOCK_T`` blocks); ``-inf`` for a row with no visible slot.
* pass 2, grid ``(B * H_kv, T blocks)``: per block of slots, recompute the logits of every row and
  sum ``exp(logit - lse)`` over the valid window queries and the group heads, then divide by
  ``G * n_valid_queries``. Only a ``BLOCK_R x BLOCK_T`` tile of probabilities exists at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvframe.kernels import interpreting
from kvframe.kernels._triton_common import load_query_rows, logits_tile


@triton.jit
def _window_lse_kernel(
    Q, K, LW, POS, VALID, QPOS, LSE,
    sqb, sqh, sqi, sqd,
    skb, skh, skt, skd,
    swb, swh, swt,
    spb, sph, spt,
    smb, smh, smt,
    sqpb, sqpi,
    H, G, W, T, D, scale, window,
    HAS_WINDOW: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < G * W
    g = (rows // W).to(tl.int64)
    i = (rows % W).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_query_rows(Q, b, h, G, g, i, offs_d, d_ok, row_ok, sqb, sqh, sqi, sqd, F32_DOT)
    qp = tl.load(QPOS + b * sqpb + i * sqpi, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        logits = logits_tile(
            q, K + b * skb + h * skh, LW + b * swb + h * swh, POS + b * spb + h * sph, VALID + b * smb + h * smh,
            qp, offs_t, t_ok, offs_d, d_ok, skt, skd, swt, spt, smt, scale, window, HAS_WINDOW, F32_DOT, False,
        )
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * (G * W) + rows, lse, mask=row_ok)


@triton.jit
def _window_sum_kernel(
    Q, K, LW, POS, VALID, QPOS, QVALID, LSE, NORM, OUT,
    sqb, sqh, sqi, sqd,
    skb, skh, skt, skd,
    swb, swh, swt,
    spb, sph, spt,
    smb, smh, smt,
    sqpb, sqpi,
    sqvb, sqvi,
    H, G, W, T, D, scale, window,
    HAS_WINDOW: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_T], tl.float32)
    for r0 in range(0, G * W, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < G * W
        g = (rows // W).to(tl.int64)
        i = (rows % W).to(tl.int64)
        q = load_query_rows(Q, b, h, G, g, i, offs_d, d_ok, row_ok, sqb, sqh, sqi, sqd, F32_DOT)
        qp = tl.load(QPOS + b * sqpb + i * sqpi, mask=row_ok, other=0)
        qv = tl.load(QVALID + b * sqvb + i * sqvi, mask=row_ok, other=0) != 0
        lse = tl.load(LSE + pid_bh.to(tl.int64) * (G * W) + rows, mask=row_ok, other=float("-inf"))
        use = row_ok & qv & (lse != float("-inf"))
        lse = tl.where(use, lse, 0.0)
        logits = logits_tile(
            q, K + b * skb + h * skh, LW + b * swb + h * swh, POS + b * spb + h * sph, VALID + b * smb + h * smh,
            qp, offs_t, t_ok, offs_d, d_ok, skt, skd, swt, spt, smt, scale, window, HAS_WINDOW, F32_DOT, False,
        )
        p = tl.where(use[:, None], tl.exp(logits - lse[:, None]), 0.0)
        acc += tl.sum(p, axis=0)
    norm = tl.load(NORM + b)
    tl.store(OUT + pid_bh.to(tl.int64) * T + offs_t, acc / G / norm, mask=t_ok)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def window_scores_triton(
    queries: Tensor,
    keys: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    query_valid: Tensor,
    scaling: float,
    sliding_window: int | None,
    block_t: int = 64,
) -> Tensor:
    """Launch the two passes; shapes as in :func:`kvframe.kernels.window.window_scores`."""
    b, hq, w, d = queries.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    out = torch.zeros((b, h, t), dtype=torch.float32, device=keys.device)
    if out.numel() == 0 or w == 0:
        return out
    # see _triton_decode: the interpreter mishandles 16-bit dots, and fp32 runs at IEEE precision
    f32 = interpreting() or not (queries.dtype == keys.dtype and queries.dtype in (torch.float16, torch.bfloat16))
    lw = log_weights.float()
    val = valid.view(torch.uint8)
    qpos = query_positions.to(device=keys.device, dtype=torch.int64)
    qval = query_valid.to(device=keys.device).view(torch.uint8)
    norm = qval.sum(-1).clamp(min=1).float().contiguous()  # [B] valid window queries
    nrows = g * w
    block_r = min(_pow2(nrows), 64)
    lse = torch.empty((b * h, nrows), dtype=torch.float32, device=keys.device)
    common = (
        queries.stride(0), queries.stride(1), queries.stride(2), queries.stride(3),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        lw.stride(0), lw.stride(1), lw.stride(2),
        positions.stride(0), positions.stride(1), positions.stride(2),
        val.stride(0), val.stride(1), val.stride(2),
        qpos.stride(0), qpos.stride(1),
    )
    has_window = sliding_window is not None
    win = int(sliding_window) if has_window else 0
    meta = dict(HAS_WINDOW=has_window, F32_DOT=f32, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=_pow2(d))
    _window_lse_kernel[(b * h, triton.cdiv(nrows, block_r))](
        queries, keys, lw, positions, val, qpos, lse, *common, h, g, w, t, d, float(scaling), win, **meta
    )
    _window_sum_kernel[(b * h, triton.cdiv(t, block_t))](
        queries, keys, lw, positions, val, qpos, qval, lse, norm, out, *common, qval.stride(0), qval.stride(1),
        h, g, w, t, d, float(scaling), win, **meta,
    )
    return out
