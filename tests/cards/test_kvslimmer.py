"""KVSlimmer (docs/methods.md#kvslimmer): Hessian blocks, proxy, smoothing, closed-form merge, guard and
flags (second derivatives vs finite differences, minimiser, fixed points, proxy recovery), on plain tensors."""

from __future__ import annotations

import math

import pytest
import torch

import kvframe
from kvframe.errors import ConfigError
from kvframe.policies.base import CompressionContext, Selection
from kvframe.policies.merge_kvslimmer import (
    KVSlimmerKeyMerge,
    hessian_proxy,
    pair_weights,
    softmax_output_c11,
    softmax_output_c12,
)
from kvframe.slots import SlotState


def build(budget: int, n_sink: int = 2, **kw):
    return kvframe.build("kvslimmer", budget=budget, **{"selector.n_sink": n_sink}, **kw)


def reference_proxy(window: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, n_sink: int, norm: str = "l1"):
    """The Hessian proxy by hand for one head: (alpha, o, d, h) as plain lists/tensors (float64)."""
    t = window.shape[0]
    a = [window[j].item() * (1.0 if j >= n_sink else 0.0) for j in range(t)]
    total = sum(a)
    alpha = torch.tensor([x / (total + 1e-21) for x in a], dtype=torch.float64)
    v = values.double() * counts.double()[:, None]  # summed values, as the released code
    o = sum(alpha[j] * v[j] for j in range(t))
    dev = [(v[j] - o).abs().sum() if norm == "l1" else (v[j] - o).norm() for j in range(t)]
    d = torch.stack(dev)
    h = torch.where(torch.arange(t) >= n_sink, alpha * (1 - 2 * alpha) * d, 0.0)
    return alpha, o, d, h, v


def quadratic(k, kj, kk, hj, hk, h12):
    return 0.5 * hj * (k - kj).pow(2).sum() - h12 * ((k - kj) * (k - kk)).sum() + 0.5 * hk * (k - kk).pow(2).sum()


# --------------------------------------------------------------------------- 2.9 (1): exact second derivatives
def test_c11_c12_are_the_second_derivatives_of_the_softmax_output():
    torch.manual_seed(0)
    s = torch.randn(7, dtype=torch.float64)
    v = torch.randn(7, 5, dtype=torch.float64)

    def out(x):
        return torch.softmax(x, 0) @ v

    alpha = torch.softmax(s, 0)
    eps = 1e-4
    for m in (0, 3, 5):
        e_m = torch.zeros(7, dtype=torch.float64)
        e_m[m] = eps
        e_n = torch.zeros(7, dtype=torch.float64)
        e_n[m + 1] = eps
        fd11 = (out(s + e_m) - 2 * out(s) + out(s - e_m)) / eps**2
        fd12 = (out(s + e_m + e_n) - out(s + e_m - e_n) - out(s - e_m + e_n) + out(s - e_m - e_n)) / (4 * eps**2)
        assert torch.allclose(softmax_output_c11(alpha, v, m), fd11, atol=1e-5)
        assert torch.allclose(softmax_output_c12(alpha, v, m), fd12, atol=1e-5)
        # and the closed forms of c_11 and c_12 (docs/methods.md#paper-formulas)
        o = alpha @ v
        assert torch.allclose(softmax_output_c12(alpha, v, m), -alpha[m] * alpha[m + 1] * (v[m] + v[m + 1] - 2 * o))


# --------------------------------------------------------------------------- 2.9 (2-4): closed form
def test_closed_form_is_the_minimiser_of_the_quadratic():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        kj, kk = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
        hj, hk = torch.rand(2, generator=g, dtype=torch.float64) + 0.1
        h12 = torch.rand((), generator=g, dtype=torch.float64) * 0.4 * min(hj, hk)  # D > 0: convex
        a, b = pair_weights(hj, hk, h12)
        k = (a * kj + b * kk).requires_grad_(True)
        f = quadratic(k, kj, kk, hj, hk, h12)
        (grad,) = torch.autograd.grad(f, k)
        assert grad.abs().max().item() < 1e-9  # stationary
        for _ in range(20):
            delta = torch.randn(6, generator=g, dtype=torch.float64) * 0.3
            assert quadratic(k.detach() + delta, kj, kk, hj, hk, h12) >= f.item() - 1e-12  # never lower


def test_identical_keys_merge_to_themselves_and_zero_coupling_is_a_weighted_average():
    hj, hk = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    a, b = pair_weights(hj, hk, torch.tensor(0.0, dtype=torch.float64))
    assert a.item() == pytest.approx(0.75) and b.item() == pytest.approx(0.25)  # h_j / (h_j + h_{j+1})
    a, b = pair_weights(hj, hk, torch.tensor(0.05, dtype=torch.float64))
    assert (a + b).item() == pytest.approx(1.0)
    # through the compressor: identical (pre-RoPE) keys stay that key whatever the proxies are
    torch.manual_seed(2)
    t, d = 8, 4
    keys = torch.randn(1, 2, t, d)
    keys[:, :, 4] = keys[:, :, 3]
    window = torch.rand(1, 2, t) + 0.5
    window[..., 3:5] = 0.01
    res = kvframe.compress(build(7), keys, torch.randn(1, 2, t, d), stats={"window_attn": window})
    assert torch.allclose(res.keys[:, :, 3], keys[:, :, 3], atol=1e-6)


def test_zero_attention_partner_gives_zero_coupling_and_keeps_the_other_key():
    torch.manual_seed(3)
    t, d = 8, 4
    keys = torch.randn(1, 1, t, d)
    window = torch.rand(1, 1, t) + 0.5
    window[0, 0, 3] = 0.01
    window[0, 0, 4] = 0.0  # alpha_4 = 0: h_4 = 0 and h12 = 0 -> a = h_3 / (h_3 + 0) = 1
    res = kvframe.compress(build(7), keys, torch.randn(1, 1, t, d), stats={"window_attn": window})
    assert torch.allclose(res.keys[0, 0, 3], keys[0, 0, 3], atol=1e-6)


# --------------------------------------------------------------------------- 2.9 (5): proxy consistency
def test_proxy_matches_hand_computation_and_dhat_recovers_the_deviation():
    torch.manual_seed(4)
    t, d, n_sink = 10, 4, 2
    values = torch.randn(1, 1, t, d, dtype=torch.float64)
    counts = torch.randint(1, 4, (1, 1, t)).double()
    window = torch.rand(1, 1, t, dtype=torch.float64)
    state = SlotState.from_tensors(torch.randn(1, 1, t, d), values, log_weights=counts.log().float()).with_stats(window_attn=window)
    out = KVSlimmerKeyMerge(n_sink=n_sink, smoothing=False).observe(state, CompressionContext())
    alpha, o, dev, h, _ = reference_proxy(window[0, 0], values[0, 0], counts[0, 0], n_sink)
    assert torch.allclose(out.stats["hproxy"][0, 0].double(), h, atol=1e-6)
    assert out.stats["hproxy_set"][0, 0].tolist() == [1.0] * t
    assert out.stats["hproxy"][0, 0, :n_sink].tolist() == [0.0] * n_sink  # sinks
    dhat = out.stats["hproxy"][0, 0].double() / (alpha * (1 - 2 * alpha) + 1e-21)
    assert torch.allclose(dhat[n_sink:], dev[n_sink:], rtol=1e-5)  # = ||V_j - o||_1
    _, _, o2 = hessian_proxy(state, n_sink)
    assert torch.allclose(o2[0, 0].double(), o, atol=1e-6)
    # the first firing (step 0, delta 1) with smoothing on takes the fresh proxy as well
    first = KVSlimmerKeyMerge(n_sink=n_sink).observe(state.with_stats(hproxy=torch.full((1, 1, t), 9.0), hproxy_set=torch.ones(1, 1, t)), CompressionContext(step=0))
    assert torch.allclose(first.stats["hproxy"], out.stats["hproxy"])


# --------------------------------------------------------------------------- smoothing across firings
def test_smoothing_with_delta():
    torch.manual_seed(5)
    t, d = 9, 4
    window = torch.rand(1, 1, t)
    old = torch.rand(1, 1, t)
    was_set = torch.tensor([[[1.0] * 6 + [0.0] * 3]])  # the last 3 slots arrived after the last compression
    state = SlotState.from_tensors(torch.randn(1, 1, t, d), torch.randn(1, 1, t, d)).with_stats(window_attn=window, hproxy=old, hproxy_set=was_set)
    pol = KVSlimmerKeyMerge(n_sink=1)
    fresh = KVSlimmerKeyMerge(n_sink=1, smoothing=False).observe(state, CompressionContext()).stats["hproxy"]
    out = pol.observe(state, CompressionContext(step=2)).stats["hproxy"]  # third firing: delta = 3
    expect = torch.where(was_set > 0, fresh / 3 + (2 / 3) * old, fresh)  # the sink (fresh 0) decays too
    assert torch.allclose(out, expect, atol=1e-7)


# --------------------------------------------------------------------------- 2.9 (6): bookkeeping + propagation
def _hand_pair(window, values, counts, keys, j, n_sink, norm="l1", power=1, exact=False):
    alpha, o, dev, h, v = reference_proxy(window, values, counts, n_sink, norm)
    if exact:
        x = alpha[j] * alpha[j + 1] * (v[j] + v[j + 1] - 2 * o)
        h12 = x.abs().sum() if norm == "l1" else x.norm()
    else:
        dhat = h / (alpha * (1 - 2 * alpha) + 1e-21)
        h12 = alpha[j] * alpha[j + 1] * (dhat[j] + dhat[j + 1])
    big_a = h[j] ** power - h12**power
    big_b = h[j + 1] ** power - h12**power
    a, b = big_a / (big_a + big_b), big_b / (big_a + big_b)
    return a * keys[j].double() + b * keys[j + 1].double(), a**2 * h[j] + b**2 * h[j + 1], (a, b)


def _pair_case(seed=6, t=10, d=4):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 1, t, d, generator=g)
    values = torch.randn(1, 1, t, d, generator=g)
    counts = torch.randint(1, 3, (1, 1, t), generator=g).double()
    window = torch.rand(1, 1, t, generator=g) + 1.0
    window[0, 0, 5:7] = 0.2  # pair (5, 6) merges
    return keys, values, counts, window


@pytest.mark.parametrize(
    "flags, hand",
    [
        ({}, {}),
        ({"key_merge.norm": "l2"}, {"norm": "l2"}),
        ({"key_merge.power": 2}, {"power": 2}),
        ({"key_merge.exact_c12": True}, {"exact": True}),
    ],
    ids=["code", "l2", "power2", "exact_c12"],
)
def test_merge_bookkeeping_and_propagation(flags, hand):
    keys, values, counts, window = _pair_case()
    t, n_sink = keys.shape[2], 2
    comp = build(t - 1, n_sink, **{"key_merge.n_sink": n_sink, "value_merge.clamp": None}, **flags)
    res = kvframe.compress(comp, keys, values, log_weights=counts.log().float(), stats={"window_attn": window})
    k_out, v_out, pos, lw = res.head(0, 0)
    assert k_out.shape[0] == t - 1
    assert pos.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # merged slot at its later token
    cnt = lw.double().exp()
    assert cnt.sum().item() == pytest.approx(counts.sum().item())
    v_sum = values[0, 0, 5].double() * counts[0, 0, 5] + values[0, 0, 6].double() * counts[0, 0, 6]
    assert torch.allclose(v_out[5].double() * cnt[5], v_sum, atol=1e-5)
    k_exp, h_exp, (a, b) = _hand_pair(window[0, 0], values[0, 0], counts[0, 0], keys[0, 0], 5, n_sink, **hand)
    assert 0 <= a <= 1 and 0 <= b <= 1  # convex here: the guard does not interfere
    assert torch.allclose(k_out[5].double(), k_exp, atol=1e-5)
    h_out = res.state.stats["hproxy"][0, 0]
    assert h_out[5].item() == pytest.approx(h_exp.item(), rel=1e-4)  # a^2 h_j + b^2 h_{j+1}
    _, _, _, h_ref, _ = reference_proxy(window[0, 0], values[0, 0], counts[0, 0], n_sink, hand.get("norm", "l1"))
    assert torch.allclose(h_out[[0, 1, 2, 3, 4, 6, 7, 8]].double(), h_ref[[0, 1, 2, 3, 4, 7, 8, 9]], atol=1e-6)
    assert res.state.stats["hproxy_set"][0, 0].tolist() == [1.0] * (t - 1)


def test_flags_change_the_result():
    keys, values, counts, window = _pair_case()
    t = keys.shape[2]
    base = {"key_merge.n_sink": 2}
    merged = {}
    for name, extra in (("code", {}), ("l2", {"key_merge.norm": "l2"}), ("power2", {"key_merge.power": 2}), ("exact", {"key_merge.exact_c12": True})):
        res = kvframe.compress(build(t - 1, **base, **extra), keys, values, log_weights=counts.log().float(), stats={"window_attn": window})
        merged[name] = res.keys[0, 0, 5]
    for name in ("l2", "power2", "exact"):
        assert not torch.allclose(merged[name], merged["code"], atol=1e-4), name


def _two_slot_state(window, keys):
    t, d = keys.shape[2], keys.shape[3]
    g = torch.Generator().manual_seed(7)
    values = torch.randn(1, 1, t, d, generator=g)
    return SlotState.from_tensors(keys, values).with_stats(window_attn=window)


def test_guard_falls_back_when_the_quadratic_is_not_convex():
    # alpha = (0.4, 0.4, 0.1, 0.1): h_j = alpha (1 - 2 alpha) d is small next to h12 = alpha^2 (d_j + d_k) -> D < 0
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0]]]])
    window = torch.tensor([[[0.4, 0.4, 0.1, 0.1]]])
    state = _two_slot_state(window, keys)
    sel = Selection(keep=torch.tensor([[[0, 2, 3]]]), keep_valid=torch.ones(1, 1, 3, dtype=torch.bool), assign=torch.tensor([[[0, 0, 1, 2]]]))
    kept = state.gather(sel.keep, sel.keep_valid)
    ctx = CompressionContext()
    guarded = KVSlimmerKeyMerge(n_sink=0)
    state = guarded.observe(state, ctx)
    h = state.stats["hproxy"][0, 0]
    alpha = torch.tensor([0.4, 0.4, 0.1, 0.1])
    dhat = h / (alpha * (1 - 2 * alpha))
    h12 = alpha[0] * alpha[1] * (dhat[0] + dhat[1])
    big_a, big_b = h[0] - h12, h[1] - h12
    assert (big_a + big_b).item() < 0  # D <= 0: the code would extrapolate
    merged = guarded.merge(state, sel, kept, ctx)
    keys_g, stats_g = merged.keys, merged.stats
    a = h[0] / (h[0] + h[1])
    assert torch.allclose(keys_g[0, 0, 0], a * keys[0, 0, 0] + (1 - a) * keys[0, 0, 1], atol=1e-6)
    assert stats_g["hproxy"][0, 0, 0].item() == pytest.approx((a**2 * h[0] + (1 - a) ** 2 * h[1]).item(), rel=1e-5)
    assert torch.equal(keys_g[0, 0, 1:], keys[0, 0, 2:])  # unmerged slots untouched
    raw = KVSlimmerKeyMerge(n_sink=0, guard=False).merge(state, sel, kept, ctx).keys  # the code: no guard
    d = big_a + big_b + 1e-21
    assert torch.allclose(raw[0, 0, 0], (big_a / d) * keys[0, 0, 0] + (big_b / d) * keys[0, 0, 1], atol=1e-5)
    assert not torch.allclose(raw[0, 0, 0], keys_g[0, 0, 0])


def test_groups_of_three_minimise_the_generalised_quadratic():
    torch.manual_seed(8)
    t, d = 6, 3
    keys = torch.randn(1, 1, t, d, dtype=torch.float64)
    window = torch.tensor([[[0.1, 0.05, 0.08, 0.07, 0.3, 0.4]]], dtype=torch.float64)
    state = _two_slot_state(window, keys)
    sel = Selection(keep=torch.tensor([[[0, 3, 4, 5]]]), keep_valid=torch.ones(1, 1, 4, dtype=torch.bool), assign=torch.tensor([[[0, 1, 1, 1, 2, 3]]]))
    pol = KVSlimmerKeyMerge(n_sink=0)
    ctx = CompressionContext()
    state = pol.observe(state, ctx)
    out = pol.merge(state, sel, state.gather(sel.keep, sel.keep_valid), ctx).keys
    h = state.stats["hproxy"][0, 0].double()
    alpha = window[0, 0] / window.sum()
    dhat = h / (alpha * (1 - 2 * alpha))
    h12 = alpha[1] * alpha[2] * (dhat[1] + dhat[2])
    h23 = alpha[2] * alpha[3] * (dhat[2] + dhat[3])
    k1, k2, k3 = keys[0, 0, 1], keys[0, 0, 2], keys[0, 0, 3]

    def f(k):
        return 0.5 * (h[1] * (k - k1).pow(2).sum() + h[2] * (k - k2).pow(2).sum() + h[3] * (k - k3).pow(2).sum()) - h12 * ((k - k1) * (k - k2)).sum() - h23 * ((k - k2) * (k - k3)).sum()

    k = out[0, 0, 1].double().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(k), k)
    assert grad.abs().max().item() < 1e-5
    weights = torch.stack([h[1] - h12, h[2] - h12 - h23, h[3] - h23])
    assert torch.allclose(out[0, 0, 1].double(), (weights[:, None] * keys[0, 0, 1:4]).sum(0) / weights.sum(), atol=1e-6)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "override, field",
    [
        ({"key_merge.norm": "l3"}, "norm"),
        ({"key_merge.power": 3}, "power"),
        ({"key_merge.exact_c12": 1}, "exact_c12"),
        ({"key_merge.guard": "on"}, "guard"),
        ({"key_merge.smoothing": None}, "smoothing"),
        ({"key_merge.n_sink": -2}, "n_sink"),
    ],
)
def test_bad_hyperparameters_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        kvframe.build("kvslimmer", **override)


def test_card_builds_forward_only_and_needs_window_attention():
    comp = kvframe.build("kvslimmer")
    assert comp.trigger.scoring_pass == "forward" and comp.stats == ("window_attn",)
    assert comp.selector.count_factor is False and comp.value_merge.clamp == 5 and comp.budget == 2080
    with pytest.raises(ConfigError, match="window_attn"):
        kvframe.compress(build(6), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4))
    assert math.isclose(comp.selector.temperature, 4096 / math.log(512))
