"""Inputs for timing each ``kvframe::`` custom op at model shapes (used by ``benchmarks/compiled.py``).

Shapes follow one layer of an 8B-class GQA model (32 query heads, 8 KV heads, head dim 128) at 8k
context, batch 1 (decode attention also at batch 8): the sizes where the kernels are meant to pay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvframe.kernels.compact import group_reduce
from kvframe.kernels.decode import slot_decode_attention
from kvframe.kernels.walk import balance_signs
from kvframe.kernels.window import window_scores


def kernel_cases(device: torch.device, t: int = 8192, dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, Callable[[], object]]]:
    g = torch.Generator(device=device).manual_seed(0)
    h, hq, d = 8, 32, 128

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device).to(dt)

    cases: list[tuple[str, Callable[[], object]]] = []
    keys, values = rnd(1, h, t, d), rnd(1, h, t, d)
    lw = torch.zeros(1, h, t, device=device)
    pos = torch.arange(t, device=device).expand(1, h, t).contiguous()
    valid = torch.ones(1, h, t, dtype=torch.bool, device=device)
    qw = rnd(1, hq, 64, d)
    qpos = torch.arange(t - 64, t, device=device)[None]
    qvalid = torch.ones(1, 64, dtype=torch.bool, device=device)
    cases.append((f"window_scores (w=64, T={t}, bf16)", lambda: window_scores(qw, keys, lw, pos, valid, qpos, qvalid)))
    for b in (1, 8):
        kb, vb = keys.expand(b, -1, -1, -1).contiguous(), values.expand(b, -1, -1, -1).contiguous()
        # ragged heads: head i keeps t - i*t/16 slots (AdaKV-like), the rest is padding
        vmask = torch.arange(t, device=device)[None, None, :] < (t - torch.arange(h, device=device) * (t // 16))[None, :, None]
        vmask = vmask.expand(b, h, t).contiguous()
        lwb, posb = lw.expand(b, h, t).contiguous(), pos.expand(b, h, t).contiguous()
        q1 = rnd(b, hq, 1, d)
        qp = torch.full((b, 1), t, device=device)
        cases.append((f"slot_decode_attention (batch {b}, S={t}, ragged, bf16)",
                      lambda q1=q1, kb=kb, vb=vb, lwb=lwb, posb=posb, vmask=vmask, qp=qp:
                      slot_decode_attention(q1, kb, vb, lwb, posb, vmask, qp)))
    s = t // 2
    assign = (torch.arange(t, device=device) // 2).expand(1, h, t).contiguous()  # pairs fold together
    w = torch.rand(1, h, t, generator=g, device=device)
    cases.append((f"group_reduce (T={t} -> S={s}, bf16 values)", lambda: group_reduce(values, w, assign, s)))
    nb, n = t // 256, 128  # BalanceKV blocks of 128 (one round over half the tokens per head)
    kb2, vb2 = rnd(h, nb, n, d, dt=torch.float32), rnd(h, nb, n, d, dt=torch.float32)
    vb2valid = torch.ones(h, nb, n, dtype=torch.bool, device=device)
    u = torch.rand(h, nb, n, generator=g, device=device)
    cases.append((f"balance_signs ({h}x{nb} blocks of {n})", lambda: balance_signs(kb2, vb2, vb2valid, u, 4.0, 1.0, 0.0, 0.025)))
    return cases
