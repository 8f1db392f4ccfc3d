"""``kvframe::balance_signs``: BalanceKV's self-balancing walk over blocks (``docs/methods.md#self-balancing-walk``).

Layout: ``keys`` ``[G, nb, n, d]`` and ``values`` ``[G, nb, n, dv]`` (any float dtype, computed in
float32), ``valid`` ``[G, nb, n]`` bool (false = padding), ``u`` ``[G, nb, n]`` float32 uniforms
(drawn by the caller, so the op itself is deterministic). Every ``(g, block)`` is an independent
walk over its ``n`` entries with the kernel

    Ker_ab = exp(min(temp * <k̄_a, k̄_b> / sqrt(d) - beta, 60)) * (<v_a, v_b> + const + 1e-8) * valid_a * valid_b

where ``k̄ = k - mean_{valid}(k)`` are the keys centred by the mean over the block's real entries
(rows/columns of padding are 0, so padding never influences the walk). The walk is

    s_0 = +1,   s_i = +1 if u_i < 1/2 - gamma * sum_{b<i} Ker_ib s_b else -1   (i = 1..n-1),

and the op returns ``signs`` ``[G, nb, n]`` float32: ``s_i`` (±1) on real entries, 0 on padding.

Backends (:func:`kvframe.kernels.use_triton`): the torch reference builds the ``[..., n, n]`` kernel
matrix and walks all blocks in parallel, one step per ``i``; the Triton kernel
(:mod:`kvframe.kernels._triton_walk`) runs one program per ``(g, block)`` that keeps the block's
centred keys and values in registers and computes kernel row ``i`` on the fly at step ``i`` (never
the ``n × n`` matrix), all in float32. The two backends' kernel entries differ in the last bits
(different summation orders of the dot products), so a sign can differ only where ``u_i`` is within
rounding of its threshold.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvframe.kernels import use_triton

MAX_EXPONENT = 60.0  # fp32 overflow guard on the kernel exponent (the walk saturates long before)


def balance_kernel(
    keys: Tensor,
    values: Tensor,
    temp: float = 1.0,
    beta: float = 0.0,
    const: float = 0.025,
    valid: Tensor | None = None,
) -> Tensor:
    """``[..., n, n]`` kernel ``exp(temp <k̄_a, k̄_b>/sqrt d - beta) (<v_a, v_b> + const + 1e-8)`` in fp32.

    Keys are centred by the mean over the real (``valid``) entries; rows and columns of padding are 0.
    """
    k = keys.float()
    v = values.float()
    d = k.shape[-1]
    if valid is None:
        mean = k.mean(dim=-2, keepdim=True)
    else:
        m = valid[..., None].float()
        mean = (k * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp(min=1.0)
    kc = k - mean
    logits = (temp * (kc @ kc.transpose(-1, -2)) / math.sqrt(d) - beta).clamp(max=MAX_EXPONENT)
    ker = torch.exp(logits) * (v @ v.transpose(-1, -2) + const + 1e-8)
    if valid is not None:
        vm = valid.float()
        ker = ker * vm[..., :, None] * vm[..., None, :]
    return ker


def walk_signs(ker: Tensor, u: Tensor, gamma: float) -> Tensor:
    """The self-balancing walk over a precomputed kernel ``[..., n, n]`` with uniforms ``u`` ``[..., n]``."""
    n = ker.shape[-1]
    signs = torch.zeros(ker.shape[:-1], dtype=torch.float32, device=ker.device)
    if n == 0:
        return signs
    acc = torch.zeros_like(signs)  # acc[..., i] = sum_{b decided} Ker_ib s_b
    signs[..., 0] = 1.0
    acc += ker[..., :, 0]
    for i in range(1, n):
        p = 0.5 - gamma * acc[..., i]
        s = torch.where(u[..., i] < p, 1.0, -1.0)
        signs[..., i] = s
        acc += ker[..., :, i] * s[..., None]
    return signs


def balance_signs_reference(
    keys: Tensor, values: Tensor, valid: Tensor, u: Tensor, gamma: float, temp: float, beta: float, const: float
) -> Tensor:
    """Torch reference of ``kvframe::balance_signs`` (full kernel matrix, all blocks walked in parallel)."""
    ker = balance_kernel(keys, values, temp, beta, const, valid)
    return walk_signs(ker, u.float(), gamma) * valid.float()


@torch.library.custom_op("kvframe::balance_signs", mutates_args=())
def balance_signs_op(
    keys: Tensor, values: Tensor, valid: Tensor, u: Tensor, gamma: float, temp: float, beta: float, const: float
) -> Tensor:
    """Signs ``[G, nb, n]`` of the self-balancing walk of every block, see the module docstring."""
    if use_triton(keys):
        from kvframe.kernels import _triton_walk

        return _triton_walk.balance_signs_triton(keys, values, valid, u, gamma, temp, beta, const)
    return balance_signs_reference(keys, values, valid, u, gamma, temp, beta, const)


@balance_signs_op.register_fake
def _balance_signs_fake(
    keys: Tensor, values: Tensor, valid: Tensor, u: Tensor, gamma: float, temp: float, beta: float, const: float
) -> Tensor:
    return keys.new_empty(keys.shape[:-1], dtype=torch.float32)


def balance_signs(
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    u: Tensor,
    gamma: float = 4.0,
    temp: float = 1.0,
    beta: float = 0.0,
    const: float = 0.025,
) -> Tensor:
    """``kvframe::balance_signs``: signs ``[G, nb, n]`` (float32 ±1, 0 for padding) of the walk
    ``s_0 = +1``, ``s_i = +1 iff u_i < 1/2 - gamma sum_{b<i} Ker_ib s_b`` over every block.

    ``keys`` ``[G, nb, n, d]``, ``values`` ``[G, nb, n, dv]``, ``valid`` ``[G, nb, n]`` (bool),
    ``u`` ``[G, nb, n]`` (uniforms, cast to float32); ``Ker`` as in :func:`balance_kernel`.
    """
    if keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(
            f"balance_signs: keys [G,nb,n,d] and values [G,nb,n,dv]; got {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if valid.shape != keys.shape[:3] or u.shape != keys.shape[:3]:
        raise ValueError(
            f"balance_signs: valid and u must be [G,nb,n] = {tuple(keys.shape[:3])}; "
            f"got {tuple(valid.shape)}, {tuple(u.shape)}"
        )
    return balance_signs_op(keys, values, valid.bool(), u.float(), float(gamma), float(temp), float(beta), float(const))
