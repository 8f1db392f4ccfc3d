"""``kvframe::window_scores``: how much attention an observation window of queries pays each slot.

For batch row ``b``, KV head ``h`` (query heads ``h*G .. h*G+G-1``, ``G = H_q / H_kv``), window
query ``i`` and slot ``t``::

    logit[g, i, t] = scaling * <queries[b, h*G+g, i], keys[b, h, t]> + log_weights[b, h, t]
    visible[i, t]  = valid[b, h, t] and positions[b, h, t] <= qpos[b, i]
                     and (no window or qpos[b, i] - positions[b, h, t] < sliding_window)
    A[g, i, t]     = softmax_t(logit[g, i, :] over visible t)   (0 where not visible; a row with
                     no visible slot, or a padding query (query_valid false), is all zero)
    score[b, h, t] = sum_i sum_g A[g, i, t] / (G * max(1, #valid window queries of row b))

i.e. SnapKV's window attention summed over the window, averaged over the GQA group and divided by
the number of valid window queries. Pooling along ``t`` (SnapKV's ``kernel``) is *not* part of the
op: it is a cheap torch step on the ``[B, H, T]`` result, done by the scorer.

Layouts: ``queries [B, H_q, w, D]`` (the window only, any float dtype), ``keys [B, H, T, D]``,
``log_weights [B, H, T]`` float32, ``positions [B, H, T]`` int64, ``valid [B, H, T]`` bool,
``query_positions [B, w]`` int64, ``query_valid [B, w]`` bool. Returns ``[B, H, T]`` float32.

The torch reference computes the softmax rows with einsum + softmax, a few window queries at a
time (at most :data:`REFERENCE_CHUNK_ELEMENTS` probabilities at once; one chunk, hence exactly the
former attention-rows computation, kept in the tests as ``tests/kernels/reference.py``, for usual sizes). The Triton kernels
(``_triton_window``) never hold more than a tile of probabilities: pass 1 gets each row's
log-sum-exp over ``T``, pass 2 sums the probabilities per block of slots.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from kvframe.errors import ConfigError
from kvframe.kernels import norm_window, use_triton

#: Dtypes the Triton kernel takes (it computes in fp32); float64 inputs always run the torch reference.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Float32 probabilities the torch reference materialises at once (256 MiB).
REFERENCE_CHUNK_ELEMENTS = 1 << 26


def window_scores_reference(
    queries: Tensor,
    keys: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    query_valid: Tensor,
    scaling: float,
    sliding_window: Optional[int],
) -> Tensor:
    """The torch reference of ``kvframe::window_scores`` (see the module docstring)."""
    sliding_window = norm_window(sliding_window)
    b, hq, w, d = queries.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    qw = queries.float().reshape(b, h, g, w, d)
    kf = keys.float()
    qpos = query_positions.to(positions.device)
    qv = query_valid.to(positions.device)
    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, b * h * g * t))
    acc: Tensor | None = None
    for i0 in range(0, w, chunk):
        logits = torch.einsum("bhgwd,bhtd->bhgwt", qw[:, :, :, i0 : i0 + chunk], kf) * scaling
        qp = qpos[:, i0 : i0 + chunk][:, None, None, :, None]
        visible = valid[:, :, None, None, :] & (positions[:, :, None, None, :] <= qp)
        if sliding_window is not None:
            visible = visible & (qp - positions[:, :, None, None, :] < sliding_window)
        logits = logits + log_weights[:, :, None, None, :]
        logits = logits.masked_fill(~visible, float("-inf"))
        rows = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        rows = rows * qv[:, i0 : i0 + chunk][:, None, None, :, None]
        part = rows.sum(dim=3)  # [B, H, G, T]
        acc = part if acc is None else acc + part
    if acc is None:
        return torch.zeros((b, h, t), dtype=torch.float32, device=keys.device)
    n_valid_q = qv.sum(-1).clamp(min=1).float()[:, None, None]
    return acc.mean(dim=2) / n_valid_q


@torch.library.custom_op("kvframe::window_scores", mutates_args=())
def window_scores_op(
    queries: Tensor,
    keys: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    query_valid: Tensor,
    scaling: float,
    sliding_window: Optional[int] = None,
) -> Tensor:
    """``kvframe::window_scores`` (see the module docstring): Triton or the torch reference."""
    if use_triton(keys) and queries.dtype in TRITON_DTYPES and keys.dtype in TRITON_DTYPES:
        from kvframe.kernels import _triton_window

        return _triton_window.window_scores_triton(
            queries, keys, log_weights, positions, valid, query_positions, query_valid, scaling, norm_window(sliding_window)
        )
    return window_scores_reference(queries, keys, log_weights, positions, valid, query_positions, query_valid, scaling, sliding_window)


@window_scores_op.register_fake
def _window_scores_fake(
    queries: Tensor,
    keys: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Tensor,
    query_valid: Tensor,
    scaling: float,
    sliding_window: Optional[int] = None,
) -> Tensor:
    b, h, t, _ = keys.shape
    return keys.new_empty((b, h, t), dtype=torch.float32)


def window_scores(
    queries: Tensor,
    keys: Tensor,
    log_weights: Tensor,
    positions: Tensor,
    valid: Tensor,
    query_positions: Optional[Tensor] = None,
    query_valid: Optional[Tensor] = None,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> Tensor:
    """Window score ``[B, H, T]`` float32 of the window queries ``[B, H_q, w, D]`` over the slots.

    See the module docstring for the formula and layouts. ``query_positions=None`` means no
    causal or sliding-window masking (every valid slot is visible), ``query_valid=None`` that every
    window query is real, ``scaling=None`` is ``1/sqrt(D)``. Runs the op ``kvframe::window_scores``
    on detached inputs (scores are not differentiated)."""
    if queries.dim() != 4 or keys.dim() != 4:
        raise ConfigError(
            f"window_scores expects queries [B, Hq, w, D] and keys [B, H, T, D]; got {tuple(queries.shape)}, {tuple(keys.shape)}"
        )
    b, hq, w, d = queries.shape
    h, t = keys.shape[1], keys.shape[2]
    if hq % h:
        raise ConfigError(f"query heads ({hq}) is not a multiple of KV heads ({h})")
    if keys.shape[0] != b or keys.shape[3] != d:
        raise ConfigError(f"window_scores: queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not fit")
    for name, x in (("log_weights", log_weights), ("positions", positions), ("valid", valid)):
        if tuple(x.shape) != (b, h, t):
            raise ConfigError(f"window_scores: {name} must be [B, H, T] = [{b}, {h}, {t}]; got {tuple(x.shape)}")
    device = keys.device
    if query_positions is None:
        query_positions = torch.full((b, w), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
        sliding_window = None
    if query_valid is None:
        query_valid = torch.ones((b, w), dtype=torch.bool, device=device)
    if tuple(query_positions.shape) != (b, w) or tuple(query_valid.shape) != (b, w):
        raise ConfigError(
            f"window_scores: query positions and validity must be [B, w] = [{b}, {w}]; got "
            f"{tuple(query_positions.shape)}, {tuple(query_valid.shape)}"
        )
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    return window_scores_op(
        queries.detach(),
        keys.detach(),
        log_weights.detach().float(),
        positions.to(device=device, dtype=torch.int64),
        valid.to(device=device, dtype=torch.bool),
        query_positions.to(device=device, dtype=torch.int64),
        query_valid.to(device=device, dtype=torch.bool),
        scale,
        norm_window(sliding_window),
    )
