"""``kvframe::group_reduce`` and ``kvframe::balance_signs``: Triton (CPU interpreter) vs torch reference.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported, so ``kernel_backend("triton")``
runs the Triton kernels in Triton's interpreter on CPU tensors (about 1-2 ms per program instance:
shapes stay tiny).
"""

from __future__ import annotations

import pytest
import torch

from torch._dynamo.testing import CompileCounterWithBackend

from kvframe.errors import ConfigError
from kvframe.kernels import kernel_backend
from kvframe.kernels.compact import group_reduce, group_reduce_reference
from kvframe.kernels.walk import balance_kernel, balance_signs, balance_signs_reference

pytest.importorskip("triton")


# ---------------------------------------------------------------------------- inputs
def _reduce_inputs(b=2, h=3, t=37, dv=5, s=9, dtype=torch.float32, seed=0):
    """Random values/weights and an assignment with dropped slots, multi-member and empty groups."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, h, t, dv, generator=g).to(dtype)
    weights = torch.rand(b, h, t, generator=g) + 0.1
    assign = torch.randint(-1, s - 2, (b, h, t), generator=g)  # slots s-2, s-1 stay empty ...
    assign[:, :, :4] = s - 2  # ... except s-2, a 4-member group in every row
    assign[0, 0, :] = -1  # a row with everything dropped
    assign[-1, -1, 5] = s - 1  # a single-member group
    values = torch.where((assign < 0)[..., None], torch.full_like(values, float("nan")), values)  # dropped: ignored
    return values, weights, assign, s


def _walk_inputs(g_=2, nb=3, n=37, d=16, dv=8, dtype=torch.float32, seed=0, pad=7):
    """Blocks of clustered keys / offset values; the last block of every sequence is padded (garbage)."""
    g = torch.Generator().manual_seed(seed)
    keys = (0.7 * torch.randn(g_, nb, n, d, generator=g)).to(dtype)
    values = (torch.randn(g_, nb, n, dv, generator=g) + 0.5).to(dtype)
    valid = torch.ones(g_, nb, n, dtype=torch.bool)
    valid[:, -1, n - pad :] = False
    keys = torch.where(valid[..., None], keys, torch.full_like(keys, 30.0))
    values = torch.where(valid[..., None], values, torch.full_like(values, -5.0))
    u = torch.rand(g_, nb, n, generator=g)
    return keys, values, valid, u


def _walk_margin(keys, values, valid, u, signs, gamma, temp=1.0, beta=0.0, const=0.025):
    """Smallest ``|u_i - p_i| / bound_i`` along the walk ``signs``, with ``bound_i`` a generous bound on
    how far ``p_i`` can move under last-bit differences of the kernel entries. Above 1: no sign can
    flip between backends that compute ``Ker`` to within ``1e-5`` relative."""
    ker = balance_kernel(keys, values, temp, beta, const, valid).double()
    low = torch.tril(ker, diagonal=-1)
    acc = (low @ signs.double()[..., None])[..., 0]  # acc_i = sum_{b<i} Ker_ib s_b
    p = 0.5 - gamma * acc
    bound = gamma * 1e-5 * (low.abs().sum(-1)) + 1e-6
    decided = torch.where(u.double() < p, 1.0, -1.0)
    assert torch.equal(torch.where(valid, decided, 0.0)[..., 1:], signs.double()[..., 1:])  # p is the walk's
    ratio = (u.double() - p).abs() / bound
    ratio[..., 0] = float("inf")  # s_0 is fixed
    ratio = torch.where(valid, ratio, float("inf"))
    return float(ratio.min())


# ---------------------------------------------------------------------------- group_reduce
@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, dict(b=2, h=3, t=37, dv=5, s=9)),
        (torch.bfloat16, dict(b=2, h=3, t=37, dv=5, s=9)),
        (torch.float32, dict(b=1, h=2, t=70, dv=130, s=6)),  # 2 T-blocks per row, 2 D-chunks
    ],
)
def test_group_reduce_triton_matches_reference(dtype, shape):
    values, weights, assign, s = _reduce_inputs(dtype=dtype, **shape)
    ref = group_reduce(values, weights, assign, s)
    with kernel_backend("triton"):
        tri = group_reduce(values, weights, assign, s)
    for r, x in zip(ref, tri):
        assert r.shape == x.shape and r.dtype == x.dtype
    # float sums: same products, possibly another summation order (atomics): fp32 rounding only;
    # bf16 inputs are converted to fp32 exactly on both sides, so the same tolerance holds
    assert torch.allclose(tri[0], ref[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(tri[1], ref[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(tri[2], ref[2])
    assert torch.isfinite(tri[0]).all()  # NaN values of dropped slots never leak in
    # empty groups are exactly 0; single-member groups are bit-exact
    empty = ref[2] == 0
    assert empty.any() and (tri[0][empty] == 0).all() and (tri[1][empty] == 0).all()
    single = ref[2] == 1
    assert single.any() and torch.equal(tri[0][single], ref[0][single]) and torch.equal(tri[1][single], ref[1][single])
    assert (ref[2] >= 4).any()


def test_group_reduce_reference_equals_the_group_sums():
    from kvframe.policies.groups import group_sum

    values, weights, assign, s = _reduce_inputs()
    vsum, wsum, count = group_reduce(values, weights, assign, s)
    assert torch.equal(vsum, group_sum(values.float() * weights[..., None], assign, s).contiguous())
    assert torch.equal(wsum, group_sum(weights, assign, s))
    assert torch.equal(count, group_sum((assign >= 0).long(), assign, s))


def test_merge_policies_on_triton_match_torch():
    from kvframe.policies.merge_convex import convex_merge

    values, weights, assign, s = _reduce_inputs(seed=3)
    kept = torch.randn(values.shape[0], values.shape[1], s, values.shape[-1])
    ref = convex_merge(values, weights, assign, kept)
    with kernel_backend("triton"):
        tri = convex_merge(values, weights, assign, kept)
    assert torch.allclose(tri, ref, rtol=1e-5, atol=1e-5)
    members = group_reduce(values, weights, assign, s)[2]
    untouched = members <= 1
    assert torch.equal(tri[untouched], kept[untouched])  # slots nothing was folded into keep their bits


# ---------------------------------------------------------------------------- balance_signs
@pytest.mark.parametrize(
    "dtype,kw,params",
    [
        (torch.float32, dict(), dict(gamma=4.0)),
        (torch.bfloat16, dict(seed=1), dict(gamma=4.0)),
        (
            torch.float32,
            dict(seed=2, g_=1, nb=2, n=20, d=5, dv=3, pad=19),  # a last block with a single real entry
            dict(gamma=0.5, temp=0.3, beta=0.2, const=0.1),
        ),
        (torch.float32, dict(seed=4, g_=1, nb=1, n=128, d=64, dv=64, pad=0), dict(gamma=4.0)),  # the default block
    ],
)
def test_balance_signs_triton_matches_reference(dtype, kw, params):
    keys, values, valid, u = _walk_inputs(dtype=dtype, **kw)
    ref = balance_signs(keys, values, valid, u, **params)
    # identical signs are only guaranteed away from ties u_i ~ p_i: these inputs stay clear of them
    assert _walk_margin(keys, values, valid, u, ref, **params) > 1.0
    with kernel_backend("triton"):
        tri = balance_signs(keys, values, valid, u, **params)
    assert tri.dtype == torch.float32 and tri.shape == valid.shape
    assert torch.equal(tri, ref)
    assert torch.equal(ref.abs(), valid.float())  # ±1 on real entries, 0 on padding
    assert (ref[..., 0][valid[..., 0]] == 1).all()


def test_balance_signs_padding_never_matters_on_triton():
    keys, values, valid, u = _walk_inputs(g_=1, nb=3, n=24, seed=5, pad=9)
    valid[0, 0] = False  # a block that is all padding
    other_k = torch.where(valid[..., None], keys, -40.0)
    other_v = torch.where(valid[..., None], values, 9.0)
    with kernel_backend("triton"):
        a = balance_signs(keys, values, valid, u)
        b = balance_signs(other_k, other_v, valid, u)
    assert torch.equal(a, b) and torch.equal(a, balance_signs(keys, values, valid, u))
    assert (a[0, 0] == 0).all() and torch.equal(a.abs(), valid.float())


def test_self_balancing_signs_wrapper_on_triton():
    from kvframe.policies.select_balanced_walk import self_balancing_signs

    g = torch.Generator().manual_seed(11)
    k, v = 0.5 * torch.randn(2, 40, 8, generator=g), torch.randn(2, 40, 8, generator=g) + 1.0
    ref = self_balancing_signs(k, v, generator=torch.Generator().manual_seed(1))
    with kernel_backend("triton"):
        tri = self_balancing_signs(k, v, generator=torch.Generator().manual_seed(1))
    assert ref.shape == (2, 40) and torch.equal(tri, ref)


def test_balance_signs_reference_is_the_matrix_walk():
    keys, values, valid, u = _walk_inputs(seed=6)
    direct = balance_signs_reference(keys, values, valid, u, 4.0, 1.0, 0.0, 0.025)
    assert torch.equal(balance_signs(keys, values, valid, u), direct)


# ---------------------------------------------------------------------------- dispatch
def test_default_backend_on_cpu_uses_the_torch_reference(monkeypatch):
    from kvframe.kernels import _triton_compact, _triton_walk

    monkeypatch.delenv("KVFRAME_KERNELS", raising=False)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise AssertionError("Triton launcher called on CPU under backend 'auto'")

    monkeypatch.setattr(_triton_compact, "group_reduce_triton", boom)
    monkeypatch.setattr(_triton_walk, "balance_signs_triton", boom)
    values, weights, assign, s = _reduce_inputs()
    keys, vals, valid, u = _walk_inputs(g_=1, nb=1, n=9)
    out = group_reduce(values, weights, assign, s)
    assert all(torch.equal(a, b) for a, b in zip(out, group_reduce_reference(values, weights, assign, s)))
    signs = balance_signs(keys, vals, valid, u)
    assert torch.equal(signs, balance_signs_reference(keys, vals, valid, u, 4.0, 1.0, 0.0, 0.025))
    with kernel_backend("torch"):
        group_reduce(values, weights, assign, s)
        balance_signs(keys, vals, valid, u)
    assert not calls
    with kernel_backend("triton"), pytest.raises(AssertionError, match="Triton launcher"):
        group_reduce(values, weights, assign, s)  # the patch is what the op would call
    with kernel_backend("triton"), pytest.raises(AssertionError, match="Triton launcher"):
        balance_signs(keys, vals, valid, u)


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    values, weights, assign, s = _reduce_inputs()
    keys, vals, valid, u = _walk_inputs(g_=1, nb=1, n=9)
    with kernel_backend("triton"):
        with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
            group_reduce(values, weights, assign, s)
        with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
            balance_signs(keys, vals, valid, u)


# ---------------------------------------------------------------------------- torch.library / compile
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_group_reduce(backend):
    values, weights, assign, s = _reduce_inputs(b=1, h=2, t=11, dv=3, s=4)
    values = torch.where(torch.isnan(values), 0.0, values)  # opcheck compares outputs with allclose
    with kernel_backend(backend):
        torch.library.opcheck(torch.ops.kvframe.group_reduce.default, (values, weights, assign, s))
        torch.library.opcheck(torch.ops.kvframe.group_reduce.default, (values.bfloat16(), weights, assign, s))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_balance_signs(backend):
    keys, values, valid, u = _walk_inputs(g_=1, nb=2, n=9, d=4, dv=3, pad=3)
    with kernel_backend(backend):
        torch.library.opcheck(torch.ops.kvframe.balance_signs.default, (keys, values, valid, u, 4.0, 1.0, 0.0, 0.025))


def test_ops_compile_fullgraph_without_graph_breaks():
    torch._dynamo.reset()
    values, weights, assign, s = _reduce_inputs(b=1, h=2, t=13, dv=4, s=5)

    def merge(v, w, a):
        vsum, wsum, count = group_reduce(v, w, a, s)
        return vsum / wsum.clamp(min=1e-30)[..., None], count * 2

    keys, vals, valid, u = _walk_inputs(g_=1, nb=2, n=11, d=4, dv=3, pad=2)

    def walk(k, v, m, r):
        return balance_signs(k, v, m, r, gamma=4.0, temp=1.0, beta=0.0, const=0.025) * 3.0

    eager_m, eager_w = merge(values, weights, assign), walk(keys, vals, valid, u)
    cm = CompileCounterWithBackend("aot_eager")
    cw = CompileCounterWithBackend("aot_eager")
    comp_m = torch.compile(merge, fullgraph=True, backend=cm)(values, weights, assign)
    comp_w = torch.compile(walk, fullgraph=True, backend=cw)(keys, vals, valid, u)
    assert all(torch.equal(a, b) for a, b in zip(comp_m, eager_m))
    assert torch.equal(comp_w, eager_w)
    # one graph each, holding the op as a single opaque node
    assert cm.frame_count == 1 and cw.frame_count == 1
    assert "kvframe.group_reduce" in cm.graphs[0].code and "kvframe.balance_signs" in cw.graphs[0].code
