"""Triton building blocks shared by the attention-shaped kernels (window scoring, decode attention).

Imported only from the lazily imported ``_triton_*`` kernel modules, so kvframe imports without
triton. Rows are ``(query head, query)`` pairs of one KV head, row ``r = g * n + i`` being query head
``h * G + g`` and query ``i``; a logit is ``scale * q.k + log_weight`` and a slot is visible to a row
iff ``valid & pos <= qpos [& qpos - pos < window]``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_query_rows(Q, b, h, G, g, i, offs_d, d_ok, row_ok, sqb, sqh, sqi, sqd, F32_DOT: tl.constexpr):
    """The ``[BLOCK_R, BLOCK_D]`` tile of queries of rows ``(g, i)`` of KV head ``h`` (0 for padding rows)."""
    q = tl.load(
        Q + b * sqb + (h * G + g)[:, None] * sqh + i[:, None] * sqi + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if F32_DOT:
        q = q.to(tl.float32)
    return q


@triton.jit
def logits_tile(
    q, k_base, lw_base, pos_base, val_base, qp, offs_t, t_ok, offs_d, d_ok,
    skt, skd, swt, spt, smt, scale, window,
    HAS_WINDOW: tl.constexpr, F32_DOT: tl.constexpr, ALL_VISIBLE: tl.constexpr,
):
    """``[BLOCK_R, BLOCK_T]`` logits of the rows over slots ``offs_t``, ``-inf`` where not visible.

    ``ALL_VISIBLE``: every slot in range is visible (the "attend to everything" fallback of a row
    that sees nothing), validity and positions are not read."""
    k = tl.load(k_base + offs_t[None, :] * skt + offs_d[:, None] * skd, mask=d_ok[:, None] & t_ok[None, :], other=0.0)
    if F32_DOT:
        qk = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k, out_dtype=tl.float32)
    lw = tl.load(lw_base + offs_t * swt, mask=t_ok, other=0.0).to(tl.float32)
    if ALL_VISIBLE:
        vis = t_ok[None, :]
    else:
        pos = tl.load(pos_base + offs_t * spt, mask=t_ok, other=0)
        val = tl.load(val_base + offs_t * smt, mask=t_ok, other=0) != 0
        vis = (val & t_ok)[None, :] & (pos[None, :] <= qp[:, None])
        if HAS_WINDOW:
            vis = vis & ((qp[:, None] - pos[None, :]) < window)
    return tl.where(vis, qk * scale + lw[None, :], float("-inf"))


@triton.jit
def online_softmax_step(logits, m_i, l_i, acc, v_base, offs_s, s_ok, offs_dv, dv_ok, svs, svd, F32_DOT: tl.constexpr):
    """Fold one block of logits and its values into the running ``(max, sum, weighted values)``."""
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(logits - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + offs_s[:, None] * svs + offs_dv[None, :] * svd, mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    if F32_DOT:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
    return m_new, l_i, acc * alpha[:, None] + pv
