"""``kvframe::slot_decode_attention``: attention of a few queries over weighted, ragged cache slots.

For query head ``j`` (KV head ``h = j // G``, ``G = H_q / H_kv``), query ``i`` and slot ``s``::

    logit[j, i, s] = scaling * <query[b, j, i], keys[b, h, s]> + log_weights[b, h, s]
    visible[j, i, s] = valid[b, h, s] and positions[b, h, s] <= qpos[i]
                       and (no window or qpos[i] - positions[b, h, s] < sliding_window)
    out[b, j, i] = sum_s softmax_s(logit[j, i, :] over visible s) * values[b, h, s]

A row with no visible slot (a padding query) attends to every slot instead (finite output, which
the caller ignores). GQA runs without repeating keys: query heads ``h*G .. h*G+G-1`` read KV head
``h``. ``scaling`` defaults to ``1/sqrt(D)``.

Layouts: ``query [B, H_q, q, D]`` (any float dtype; the output ``[B, H_q, q, Dv]`` has its dtype),
``keys [B, H, S, D]``, ``values [B, H, S, Dv]``, ``log_weights [B, H, S]`` (float),
``positions [B, H, S]`` int64, ``valid [B, H, S]`` bool (``positions``, ``valid`` and
``log_weights`` may also be ``[B, 1, S]``, shared by all heads), ``qpos [B, q]`` or ``[B, H, q]``
(per-KV-head query positions) int64.

The torch reference (:func:`slot_attention_reference`) is kvframe's SDPA-over-slots computation,
which :func:`kvframe.attention._attend` also uses for more than :data:`DECODE_MAX_QUERIES` queries.
The Triton kernel (``_triton_decode``) is flash-decoding: one program per (batch, KV head, row tile,
split of S) handles the ``G * q`` query rows of that KV head with an online softmax over S blocks
in fp32; splits are merged by a log-sum-exp combine.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.kernels import norm_window, use_triton

#: Dtypes the Triton kernel takes (it computes in fp32); float64 inputs always run the torch reference.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ``_attend`` routes passes with at most this many queries per row (decoding) through the op.
DECODE_MAX_QUERIES = 4


def slot_attention_reference(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    scaling: Optional[float],
    sliding_window: Optional[int],
) -> Tensor:
    """SDPA over slots (the torch reference; any number of queries). Returns ``[B, H_q, q, Dv]``.

    When ``positions``, ``valid`` and ``log_weights`` are shared by all heads (``[B, 1, S]``) and
    the log-weights are all zero, the mask is boolean; otherwise additive (``log_weight`` where
    visible, the dtype's minimum elsewhere)."""
    sliding_window = norm_window(sliding_window)
    b, hq, q, d = query.shape
    h = keys.shape[1]
    g = hq // h
    qpos = query_positions
    qp = qpos[:, None, :, None] if qpos.dim() == 2 else qpos[..., None]  # [B, 1 or H, q, 1]
    visible = valid[:, :, None, :] & (positions[:, :, None, :] <= qp)
    if sliding_window is not None:
        visible = visible & (qp - positions[:, :, None, :] < sliding_window)
    # padding queries (and any row with nothing to see) attend to everything: finite, ignored output
    visible = visible | ~visible.any(dim=-1, keepdim=True)
    if visible.shape[1] == 1 and log_weights.shape[1] == 1 and not bool(log_weights.any()):
        mask: Tensor = visible  # bool [B, 1, q, S]
    else:
        mask = torch.where(visible, log_weights.to(query.dtype)[:, :, None, :], torch.finfo(query.dtype).min)
    hm = mask.shape[1]
    if g > 1:
        qg = query.reshape(b, h, g * q, d)
        mask = mask[:, :, None].expand(b, hm, g, q, mask.shape[-1]).reshape(b, hm, g * q, mask.shape[-1])
    else:
        qg = query
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, q, values.shape[-1])


@torch.library.custom_op("kvframe::slot_decode_attention", mutates_args=())
def slot_decode_attention_op(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> Tensor:
    """``kvframe::slot_decode_attention`` (see the module docstring): Triton or the torch reference."""
    if use_triton(query) and {query.dtype, keys.dtype, values.dtype} <= set(TRITON_DTYPES):
        from kvframe.kernels import _triton_decode

        return _triton_decode.slot_decode_attention_triton(
            query, keys, values, log_weights, positions, valid, query_positions, scaling, norm_window(sliding_window)
        )
    return slot_attention_reference(query, keys, values, log_weights, positions, valid, query_positions, scaling, sliding_window)


@slot_decode_attention_op.register_fake
def _slot_decode_attention_fake(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> Tensor:
    b, hq, q, _ = query.shape
    return query.new_empty((b, hq, q, values.shape[-1]))


def slot_decode_attention(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> Tensor:
    """Attention of ``query [B, H_q, q, D]`` over the slots; returns ``[B, H_q, q, Dv]``.

    See the module docstring for the formula and layouts. Runs the op ``kvframe::slot_decode_attention``
    (Triton for CUDA tensors under the default backend, the torch reference otherwise). The op has no
    autograd formula: call it on tensors that do not require grad."""
    if query.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ConfigError(
            f"slot_decode_attention expects query [B, Hq, q, D], keys [B, H, S, D], values [B, H, S, Dv]; got "
            f"{tuple(query.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    b, hq, q, d = query.shape
    h, s = keys.shape[1], keys.shape[2]
    if hq % h or keys.shape[0] != b or keys.shape[3] != d or values.shape[:3] != keys.shape[:3]:
        raise ConfigError(
            f"slot_decode_attention: query {tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)} "
            "do not fit (query heads must be a multiple of KV heads, head dims and slots must agree)"
        )
    for name, t in (("log_weights", log_weights), ("positions", positions), ("valid", valid)):
        if t.dim() != 3 or t.shape[0] != b or t.shape[1] not in (1, h) or t.shape[2] != s:
            raise ConfigError(f"slot_decode_attention: {name} must be [B, H, S] or [B, 1, S] = [{b}, {h}, {s}]; got {tuple(t.shape)}")
    if query_positions.shape not in ((b, q), (b, h, q)):
        raise ConfigError(f"slot_decode_attention: query positions must be [B, q] or [B, H, q]; got {tuple(query_positions.shape)}")
    if valid.dtype != torch.bool:
        raise ConfigError(f"slot_decode_attention: valid must be bool; got {valid.dtype}")
    return slot_decode_attention_op(
        query, keys, values, log_weights, positions, valid, query_positions.long(), scaling, norm_window(sliding_window)
    )
