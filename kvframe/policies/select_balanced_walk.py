"""BalanceKV selection: repeated halving of the middle of the cache by a self-balancing walk.

"BalanceKV: KV Cache Compression through Discrepancy Theory" (v1) / "Streaming Attention
Approximation via Discrepancy Theory" (v2, NeurIPS 2025), arXiv 2502.07861; implemented after the
released code ``ksheth96/BalanceKV`` (``src/balanced_walk.py``: walk and half choice;
``src/llama_forward.py``: layout; ``run_longbench.py``: defaults). Formulas and the choices below
are explained in ``docs/methods.md#balancekv``.

Per batch row and KV head the first ``n_sink`` and last ``window`` valid slots are kept exactly; the
middle is halved ``T`` times. Each round re-blocks the surviving middle tokens (in the current order)
into blocks of ``block_size``, runs the self-balancing walk per block in the feature space of the
kernel ``exp(temp <k_a, k_b>/sqrt d - beta) (<v_a, v_b> + const)`` and then chooses the kept half
from the *global* sign sequence of the row and head, as the released code does (not per block).
Kept tokens carry the weights ``w`` (products of 1 and 2) that
:mod:`kvframe.policies.merge_reweight` turns into values and log-weights.

Choices made here (the paper and the released code leave them open):

- Padding of the last block does not influence the walk: the block mean that centres the keys is
  taken over the block's real entries only, the kernel rows/columns of padding are zero, and padding
  gets sign 0 (it is then dropped, as in the code).
- ``itrs=None`` derives the number of rounds from the resolved budget ``ctx.budgets`` and the
  content ``n`` of each head: ``T = round_half_up(log2(n / budget))`` (ratio 0.5 -> 1, 0.25 -> 2,
  like ``run_longbench.py``'s ``itrs``; an absolute budget is the ratio ``budget / n``). As in the
  code (about 25% of the prompt at ``T = 2``), the sinks and the window come on top of the kept
  quarter of the middle, so the kept count can exceed the nominal budget by up to
  ``n_sink + window`` slots.
- ``ctx.generator`` of ``None`` is replaced by a ``torch.Generator`` seeded 0 (reproducible).
- Kernel exponents are clamped at 60 (an fp32 overflow guard; the walk is saturated long before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import Tensor

from kvframe.kernels.walk import balance_kernel as balance_kernel  # re-exported (moved to the kernel module)
from kvframe.kernels.walk import balance_signs
from kvframe.policies.base import CompressionContext, Selection, Selector
from kvframe.policies.contracts import Ge, Gt, Note
from kvframe.policies.groups import true_slots_first
from kvframe.policies.select_topk import keep_mask_to_selection
from kvframe.registry import register
from kvframe.slots import SlotState


@dataclass
class WeightedSelection(Selection):
    """A selection whose kept slots stand for several tokens.

    ``weight`` ``[B, H, T]``: the accumulated walk weight ``w_j`` of each kept middle slot (1 for
    exact slots and dropped slots); ``full_weight`` ``[B, H, T]``: ``2^T`` for kept middle slots,
    1 elsewhere (the count the code's logit bias ``ln 2^T`` implies).
    """

    full_weight: Tensor | None = None


# ---------------------------------------------------------------------------- pure functions
def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def self_balancing_signs(
    keys: Tensor,
    values: Tensor,
    gamma: float = 4.0,
    temp: float = 1.0,
    beta: float = 0.0,
    const: float = 0.025,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Signs ``[..., n]`` (float ±1, 0 for padding) of the self-balancing walk over each block.

    ``keys``/``values`` ``[..., n, d]``: one block per leading index, all run in parallel. ``s_1 = +1``;
    ``s_i = +1`` iff ``u_i < 1/2 - gamma * sum_{b<i} Ker_ib s_b`` (``u`` uniform; p is not clipped).
    ``u`` ``[..., n]`` is drawn here from ``generator``; the walk is the ``kvframe::balance_signs`` op
    (:mod:`kvframe.kernels.walk`: Triton on CUDA, one program per block, torch reference otherwise;
    ``Ker`` is :func:`balance_kernel`, re-exported here).
    """
    lead, n = keys.shape[:-2], keys.shape[-2]
    u = _rand(tuple(keys.shape[:-1]), generator, keys.device)  # drawn exactly as before the op existed
    if valid is None:
        valid = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device)
    valid = valid.expand(keys.shape[:-1])
    blocks = math.prod(lead)  # every leading index is one block: [1, blocks, n, *] for the op
    signs = balance_signs(
        keys.reshape(1, blocks, n, keys.shape[-1]),
        values.reshape(1, blocks, n, values.shape[-1]),
        valid.reshape(1, blocks, n),
        u.reshape(1, blocks, n),
        gamma=gamma,
        temp=temp,
        beta=beta,
        const=const,
    )
    return signs.reshape(*lead, n)


def signed_energy(signs: Tensor, ker: Tensor) -> Tensor:
    """``s^T Ker s`` per block (the squared discrepancy in the kernel's feature space)."""
    return torch.einsum("...i,...ij,...j->...", signs, ker, signs)


def choose_half(signs: Tensor) -> tuple[Tensor, Tensor]:
    """The global half choice (``docs/methods.md#choosing-the-kept-half``) for sign sequences ``[G, m]``.

    Returns ``(order, weight)`` ``[G, ⌊m/2⌋]``: positions into the sequence of the kept tokens in the
    stable descending order of their provisional weights, and those weights (2 or 1).
    """
    g, m = signs.shape
    half = m // 2
    if half == 0:
        empty = torch.zeros(g, 0, dtype=torch.long, device=signs.device)
        return empty, empty.float()
    c_neg = ((signs < 0).long().cumsum(-1) == half).int().argmax(-1)  # first hit, 0 if never
    c_pos = ((signs > 0).long().cumsum(-1) == half).int().argmax(-1)
    c = torch.maximum(c_neg, c_pos)
    flip = torch.where(signs.gather(1, c[:, None]) > 0, -1.0, 1.0)
    ar = torch.arange(m, device=signs.device)
    prov = torch.where(ar[None, :] <= c[:, None], 2.0 * signs * flip, 1.0)
    sorted_w, order = torch.sort(prov, dim=-1, descending=True, stable=True)
    return order[:, :half], sorted_w[:, :half]


def balanced_halving(
    keys: Tensor,
    values: Tensor,
    idx: Tensor,
    w: Tensor,
    gamma: float = 4.0,
    temp: float = 1.0,
    beta: float = 0.0,
    block_size: int = 128,
    const: float = 0.025,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One halving round of the walk (``docs/methods.md#self-balancing-walk``) for ``G`` sequences at once.

    ``keys``/``values`` ``[G, n, d]`` (all middle tokens), ``idx`` ``[G, m]`` surviving tokens in the
    current order, ``w`` ``[G, m]`` their accumulated weights. Returns the new ``(idx, w)``
    ``[G, ⌊m/2⌋]``, kept in the sort order of the round (the next round blocks in this order).
    """
    g, m = idx.shape
    d = keys.shape[-1]
    if m // 2 == 0:
        return idx[:, :0], w[:, :0]
    k = keys.float().gather(1, idx[..., None].expand(g, m, d))
    v = values.float().gather(1, idx[..., None].expand(g, m, values.shape[-1])) * w[..., None]
    nb = -(-m // block_size)
    pad = nb * block_size - m
    valid = torch.ones(g, m, dtype=torch.bool, device=k.device)
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    signs = self_balancing_signs(
        k.reshape(g, nb, block_size, d),
        v.reshape(g, nb, block_size, v.shape[-1]),
        gamma=gamma,
        temp=temp,
        beta=beta,
        const=const,
        generator=generator,
        valid=valid.reshape(g, nb, block_size),
    ).reshape(g, nb * block_size)[:, :m]
    order, weight = choose_half(signs)
    return idx.gather(1, order), w.gather(1, order) * weight


def balanced_walk(
    keys_mid: Tensor,
    values_mid: Tensor,
    itrs: int,
    gamma: float = 4.0,
    temp: float = 1.0,
    beta: float = 0.0,
    block_size: int = 128,
    const: float = 0.025,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``itrs`` rounds of :func:`balanced_halving` on ``[G, n, d]`` middle tokens.

    Returns ``(indices, weights)`` ``[G, ⌊…⌊n/2⌋…/2⌋]``: kept token indices into ``0..n-1`` in the
    final sort order (not positional) and their weights, products of {1, 2} (usually ``2^itrs``).
    """
    g, n = keys_mid.shape[:2]
    idx = torch.arange(n, device=keys_mid.device).expand(g, n).contiguous()
    w = torch.ones(g, n, dtype=torch.float32, device=keys_mid.device)
    for _ in range(itrs):
        idx, w = balanced_halving(keys_mid, values_mid, idx, w, gamma, temp, beta, block_size, const, generator)
    return idx, w


def uniform_halving(
    n: int, g: int, itrs: int, generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The "uniform" baseline: ``itrs`` rounds each keeping a uniformly random ``⌊m/2⌋`` of ``[G, n]``.

    Returns ``(indices, weights)`` with weights ``2^itrs`` (values are then not re-weighted).
    """
    idx = torch.arange(n, device=device).expand(g, n).contiguous()
    for _ in range(itrs):
        m = idx.shape[1]
        pick = _rand((g, m), generator, device).argsort(dim=-1)[:, : m // 2].sort(dim=-1).values
        idx = idx.gather(1, pick)
    return idx, torch.full(idx.shape, float(2**itrs), device=device)


# ---------------------------------------------------------------------------- selectors
@dataclass
class _HalvingSelector(Selector):
    """Layout shared by BalanceKV and its uniform baseline: ``[sink | halved middle | window]``."""

    uses_scores: ClassVar[bool] = False  # the halving looks at keys and values, never at scores

    n_sink: Annotated[int, Ge(0)] = 32
    window: Annotated[int, Ge(0)] = 32
    itrs: Annotated[int | None, Ge(0), Note("halving rounds; null derives them from the budget")] = None

    def rounds(self, budgets: Tensor, content: Tensor) -> Tensor:
        """``[B, H]`` halving rounds ``T``: ``itrs``, or ``round_half_up(log2(content / budget))``."""
        if self.itrs is not None:
            return torch.full_like(content, int(self.itrs))
        ratio = content.double() / budgets.double().clamp(min=1.0)
        t = torch.floor(torch.log2(ratio.clamp(min=1.0)) + 0.5).long()
        return torch.where(content > 0, t, 0)

    def _middle(self, content: Tensor) -> Tensor:
        ns = content.clamp(max=self.n_sink)
        nw = (content - ns).clamp(max=self.window)
        return content - ns - nw

    def needs_compression(self, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> bool:
        content = state.content_slots()
        return bool(((self.rounds(budgets, content) >= 1) & (self._middle(content) >= 1)).any())

    def halve(self, keys: Tensor, values: Tensor, itrs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(indices, weights)`` of the kept middle tokens of ``[G, n, d]`` after ``itrs`` rounds."""
        raise NotImplementedError  # pragma: no cover

    def select(self, scores: Tensor | None, budgets: Tensor, state: SlotState, ctx: CompressionContext) -> Selection:
        valid = state.valid
        b, h, t = valid.shape
        dev = valid.device
        gen = ctx.generator if ctx.generator is not None else torch.Generator(device=dev).manual_seed(0)
        content = valid.sum(-1)
        rounds = self.rounds(budgets, content)
        chosen = valid.clone()
        weight = torch.ones(b, h, t, dtype=torch.float32, device=dev)
        full = torch.ones(b, h, t, dtype=torch.float32, device=dev)
        for row in range(b):
            groups: dict[tuple[int, int], list[int]] = {}
            for head in range(h):
                groups.setdefault((int(content[row, head]), int(rounds[row, head])), []).append(head)
            for (n, rnd), heads in groups.items():
                ns = min(self.n_sink, n)
                nw = min(self.window, n - ns)
                n_mid = n - ns - nw
                if rnd == 0 or n_mid == 0:
                    continue
                hs = torch.tensor(heads, device=dev)
                v = valid[row, hs]  # [G, T]
                slots = true_slots_first(v)[:, :n]  # valid slot indices, ascending
                mid = slots[:, ns : ns + n_mid]  # [G, n_mid]
                d = state.keys.shape[-1]
                k_mid = state.keys[row, hs].gather(1, mid[..., None].expand(-1, -1, d))
                v_mid = state.values[row, hs].gather(1, mid[..., None].expand(-1, -1, state.values.shape[-1]))
                idx, w = self.halve(k_mid, v_mid, rnd, gen)
                kept = mid.gather(1, idx)  # slot indices of the kept middle tokens
                sub_c = chosen[row, hs]
                sub_c.scatter_(1, mid, False)
                sub_c.scatter_(1, kept, True)
                chosen[row, hs] = sub_c
                sub_w = weight[row, hs]
                sub_w.scatter_(1, kept, w.float())
                weight[row, hs] = sub_w
                sub_f = full[row, hs]
                sub_f.scatter_(1, kept, float(2**rnd))
                full[row, hs] = sub_f
        sel = keep_mask_to_selection(chosen & valid)
        return WeightedSelection(sel.keep, sel.keep_valid, assign=None, weight=weight, full_weight=full)


@register("selector", "balanced_walk")
@dataclass
class BalancedWalkSelector(_HalvingSelector):
    """BalanceKV: ``T`` rounds of block-wise self-balancing walks, global half choice."""

    gamma: Annotated[float, Ge(0)] = 4.0
    temp: Annotated[float, Gt(0)] = 1.0
    beta: float = 0.0
    block_size: Annotated[int, Ge(2)] = 128
    const: Annotated[float, Ge(0)] = 0.025

    def halve(self, keys: Tensor, values: Tensor, itrs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return balanced_walk(
            keys,
            values,
            itrs,
            gamma=float(self.gamma),
            temp=float(self.temp),
            beta=float(self.beta),
            block_size=int(self.block_size),
            const=float(self.const),
            generator=generator,
        )


@register("selector", "uniform_halving")
@dataclass
class UniformHalvingSelector(_HalvingSelector):
    """BalanceKV's "uniform" baseline: each round keeps a uniformly random half (same layout)."""

    def halve(self, keys: Tensor, values: Tensor, itrs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return uniform_halving(keys.shape[1], keys.shape[0], itrs, generator, keys.device)
