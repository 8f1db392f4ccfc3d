"""kvframe.compress on plain tensors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvframe
from kvframe.errors import ConfigError


def test_knorm_keeps_lowest_norm_half_in_position_order():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 50, 16, generator=g)
    values = torch.randn(2, 3, 50, 16, generator=g)
    res = kvframe.compress(kvframe.build("knorm", budget=0.5), keys, values)
    norms = keys.norm(dim=-1)
    for b in range(2):
        for h in range(3):
            expected = norms[b, h].argsort()[:25].sort().values
            k, v, pos, lw = res.head(b, h)
            assert torch.equal(pos, expected)
            assert torch.equal(k, keys[b, h, expected])
            assert torch.equal(v, values[b, h, expected])
            assert torch.equal(lw, torch.zeros(25))


def test_streaming_keeps_sinks_and_recent():
    keys = torch.randn(1, 2, 40, 8)
    res = kvframe.compress(kvframe.build("streaming_llm", budget=12), keys, keys.clone())
    assert res.positions[0, 0].tolist() == [0, 1, 2, 3] + list(range(32, 40))


def test_snapkv_keeps_window_and_needs_queries():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 64, 8, generator=g)
    q = torch.randn(1, 4, 64, 8, generator=g)
    comp = kvframe.build("snapkv", budget=16, scorer={"window": 8})
    res = kvframe.compress(comp, keys, keys.clone(), queries=q)
    for h in range(2):
        pos = res.positions[0, h].tolist()
        assert len(pos) == 16 and set(range(56, 64)) <= set(pos)
    import pytest

    with pytest.raises(kvframe.ConfigError, match="needs queries"):
        kvframe.compress(comp, keys, keys.clone())


def test_tova_shares_selection_across_heads():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 3, 30, 8, generator=g)
    q = torch.randn(1, 6, 1, 8, generator=g)
    res = kvframe.compress(kvframe.build("tova", budget=10), keys, keys.clone(), queries=q)
    assert torch.equal(res.positions[0, 0], res.positions[0, 1])
    assert torch.equal(res.positions[0, 0], res.positions[0, 2])


def test_random_is_seeded():
    keys = torch.randn(1, 2, 30, 8)
    a = kvframe.compress(kvframe.build("random", budget=10), keys, keys)
    b = kvframe.compress(kvframe.build("random", budget=10), keys, keys)
    c = kvframe.compress(kvframe.build("random", budget=10, scorer={"seed": 1}), keys, keys)
    assert torch.equal(a.positions, b.positions) and not torch.equal(a.positions, c.positions)


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(2, 40),
    h=st.integers(1, 4),
    ratio=st.floats(0.05, 1.0),
    method=st.sampled_from(["knorm", "streaming_llm", "random", "snapkv", "h2o", "tova", "adakv"]),
    seed=st.integers(0, 1000),
)
def test_property_budget_order_and_membership(t, h, ratio, method, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, h, t, 8, generator=g)
    values = torch.randn(2, h, t, 8, generator=g)
    q = torch.randn(2, 2 * h, min(t, 4), 8, generator=g)
    comp = kvframe.build(method, budget=ratio, **({"scorer.window": 2} if method in ("snapkv", "adakv") else {}))
    res = kvframe.compress(comp, keys, values, queries=q)
    b_expected = max(1, int(t * ratio + 0.5))
    kept = res.kept_per_head
    if method == "adakv":
        assert torch.equal(kept.sum(-1), torch.full((2,), b_expected * h))
    else:
        assert torch.equal(kept, torch.full((2, h), b_expected))
    for b in range(2):
        for hh in range(h):
            k, v, pos, lw = res.head(b, hh)
            assert torch.equal(pos, pos.sort().values) and len(set(pos.tolist())) == len(pos)
            assert torch.equal(k, keys[b, hh, pos]) and torch.equal(v, values[b, hh, pos])
            assert torch.all(lw == 0)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(4, 30), pad=st.integers(0, 3), budget=st.integers(1, 4))
def test_property_padding_never_kept(t, pad, budget):
    keys = torch.randn(2, 2, t, 8)
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :pad] = False
    res = kvframe.compress(kvframe.build("knorm", budget=budget), keys, keys, valid=valid)
    assert bool((res.positions[res.valid] >= pad * 0).all())
    assert int(res.kept_per_head[1, 0]) == min(budget, t - pad)
    assert not bool((res.valid[1] & (res.positions[1] < pad)).any())


def test_snapkv_keeps_what_the_window_attends_to():
    """Window queries aligned with key 10 make slot 10 (and its pooling neighbours) win."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 1, 40, 16, generator=g) * 0.1
    keys[0, 0, 10] = torch.ones(16)
    q = torch.ones(1, 2, 4, 16) * 3.0  # 2 query heads share the KV head (GQA)
    res = kvframe.compress(kvframe.build("snapkv", budget=5, scorer={"window": 4, "kernel": 1}), keys, keys.clone(), queries=q)
    assert res.positions[0, 0].tolist() == [10, 36, 37, 38, 39]
    res = kvframe.compress(kvframe.build("snapkv", budget=7, scorer={"window": 4, "kernel": 3, "pool": "max"}), keys, keys.clone(), queries=q)
    assert {9, 10, 11} <= set(res.positions[0, 0].tolist())


def test_observed_attention_normalises_by_visible_queries():
    """With uniform attention every key gets the same normalised score; unnormalised favours early keys."""
    keys = torch.zeros(1, 1, 8, 4)
    q = torch.zeros(1, 1, 8, 4)
    from kvframe.policies.base import CompressionContext
    from kvframe.policies.score_observed_attention import ObservedAttentionScorer
    from kvframe.slots import SlotState

    state = SlotState.from_tensors(keys, keys)
    ctx = CompressionContext(queries=q, query_positions=torch.arange(8)[None], query_valid=torch.ones(1, 8, dtype=torch.bool))
    norm = ObservedAttentionScorer().score(state, ctx)[0, 0]
    raw = ObservedAttentionScorer(normalize=False).score(state, ctx)[0, 0]
    expected = torch.tensor([sum(1.0 / (i + 1) for i in range(j, 8)) for j in range(8)])
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(norm, expected / torch.arange(8, 0, -1).float())


def test_snapkv_pools_only_the_tokens_before_the_window_like_kvpress():
    """kvpress / the SnapKV code: mean window attention of the tokens before the window, averaged
    over the GQA group, avg-pooled (kernel 5) with zero padding counted; the window always kept."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    b, h, g, t, d, w = 1, 2, 2, 40, 8, 6
    k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    q = torch.randn(b, h * g, w, d)
    comp = kvframe.build("snapkv", budget=20, **{"scorer.window": w})
    from kvframe.policies.base import CompressionContext
    from kvframe.slots import SlotState

    state = SlotState.from_tensors(k, v)
    ctx = CompressionContext(queries=q, query_positions=torch.arange(t - w, t)[None], query_valid=torch.ones(1, w, dtype=torch.bool))
    got = comp.scorer.score(state, ctx)
    # reference written from kvpress's description: causal softmax of the window queries, mean over
    # window queries and group, pre-window part pooled with zero padding
    logits = torch.einsum("bhgwd,bhtd->bhgwt", q.reshape(b, h, g, w, d), k) / d**0.5
    causal = torch.arange(t)[None, :] <= torch.arange(t - w, t)[:, None]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    pre = probs.mean(dim=(2, 3))[..., : t - w]
    pooled = F.avg_pool1d(pre.reshape(b * h, 1, t - w), 5, stride=1, padding=2).reshape(b, h, t - w)
    torch.testing.assert_close(got[..., : t - w], pooled, atol=1e-6, rtol=1e-5)
    # the window ranks above every earlier token and by recency within itself, with finite scores
    window = got[..., t - w :]
    assert torch.isfinite(window).all()
    assert (window.amin(-1) > got[..., : t - w].amax(-1)).all()
    assert (window.diff(dim=-1) > 0).all()


# ----------------------------------------------------------------------------- input validation
def _kv(b=2, h=2, t=10, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_idx": 4, "num_layers": 4}, r"layer_idx=4 must be an int in \[0, num_layers\) = \[0, 4\)"),
        ({"layer_idx": -1, "num_layers": 4}, r"layer_idx=-1 must be an int in \[0, num_layers\) = \[0, 4\)"),
        ({"layer_idx": 1.0, "num_layers": 4}, r"layer_idx=1.0 must be an int"),
        ({"layer_idx": True, "num_layers": 4}, r"layer_idx=True must be an int"),
        ({"num_layers": 0}, r"num_layers=0 must be an int >= 1"),
        ({"num_layers": "2"}, r"num_layers='2' must be an int >= 1"),
    ],
)
def test_compress_rejects_bad_layer_arguments(kwargs, message):
    keys, values = _kv()
    with pytest.raises(ConfigError, match=message):
        kvframe.compress(kvframe.build("pyramidkv" if "layer_idx" in kwargs else "knorm", budget=4), keys, values, torch.randn(2, 4, 10, 4), **kwargs)


@pytest.mark.parametrize("shape", [(11,), (3, 10), (2, 10, 1), (2, 3, 10), (1, 2, 2, 10)])
def test_compress_rejects_positions_of_the_wrong_shape(shape):
    keys, values = _kv()
    positions = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ConfigError, match=rf"positions has shape {re.escape(str(shape))}; accepted: \[T\] or \[B, T\] or \[B, H, T\] with B=2, H=2, T=10"):
        kvframe.compress(kvframe.build("knorm", budget=4), keys, values, positions=positions)


def test_compress_accepts_every_positions_layout():
    keys, values = _kv()
    comp = kvframe.build("knorm", budget=4)
    ref = kvframe.compress(comp, keys, values, positions=torch.arange(10) * 3)
    for positions in (torch.arange(10)[None] * 3, (torch.arange(10) * 3).expand(2, 10), (torch.arange(10) * 3).expand(2, 2, 10)):
        assert torch.equal(kvframe.compress(comp, keys, values, positions=positions).positions, ref.positions)


def test_compress_rejects_positions_out_of_order():
    keys, values = _kv()
    comp = kvframe.build("knorm", budget=4)
    positions = torch.arange(10).repeat(2, 1)
    positions[1, 6] = 3
    with pytest.raises(ConfigError, match=r"strictly increasing over the valid slots.*row 1, head 0: token 6 has position 3 after position 5"):
        kvframe.compress(comp, keys, values, positions=positions)
    positions = torch.arange(10).expand(2, 2, 10).clone()
    positions[0, 1, 4] = 3  # a repeated position
    with pytest.raises(ConfigError, match=r"row 0, head 1: token 4 has position 3 after position 3"):
        kvframe.compress(comp, keys, values, positions=positions)
    positions = torch.arange(10) - 2
    with pytest.raises(ConfigError, match=r"positions must be >= 0 on valid slots; row 0, head 0, token 0 has position -2"):
        kvframe.compress(comp, keys, values, positions=positions)
    # padding slots are not ordered: only valid slots count
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[:, :2] = False
    res = kvframe.compress(comp, keys, values, positions=positions, valid=valid)
    assert bool((res.positions[res.valid] >= 0).all())


@settings(max_examples=40, deadline=None)
@given(perm=st.permutations(list(range(8))), pad=st.integers(0, 7))
def test_property_position_order_is_checked_on_valid_slots(perm, pad):
    keys, values = _kv(b=1, t=8)
    positions = torch.tensor(perm)
    valid = torch.arange(8)[None] >= pad
    comp = kvframe.build("knorm", budget=1)
    content = perm[pad:]
    if content == sorted(content):
        kvframe.compress(comp, keys, values, positions=positions, valid=valid)
    else:
        with pytest.raises(ConfigError, match="strictly increasing"):
            kvframe.compress(comp, keys, values, positions=positions, valid=valid)


def test_compress_rejects_non_bool_valid():
    keys, values = _kv()
    for mask in (torch.ones(2, 10), torch.ones(2, 10, dtype=torch.long)):
        with pytest.raises(ConfigError, match=rf"valid must be a bool mask \(True for content, False for padding\); got dtype {mask.dtype}; convert"):
            kvframe.compress(kvframe.build("knorm", budget=4), keys, values, valid=mask)
    with pytest.raises(ConfigError, match=r"valid has shape \(2, 9\); accepted: \[B, T\] or \[B, H, T\]"):
        kvframe.compress(kvframe.build("knorm", budget=4), keys, values, valid=torch.ones(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("name", ["keys", "values", "queries", "positions", "valid", "log_weights"])
def test_compress_rejects_numpy_arrays(name):
    keys, values = _kv()
    args = {"keys": keys, "values": values, "queries": torch.randn(2, 4, 3, 4), "positions": torch.arange(10),
            "valid": torch.ones(2, 10, dtype=torch.bool), "log_weights": torch.zeros(2, 2, 10)}
    args[name] = args[name].numpy()
    with pytest.raises(ConfigError, match=rf"{name} must be a torch.Tensor; got numpy.ndarray; pass torch tensors \(e.g. torch.from_numpy"):
        kvframe.compress(kvframe.build("snapkv", budget=4, **{"scorer.window": 2}), **args)
    with pytest.raises(ConfigError, match=r"keys must be a torch.Tensor; got list"):
        kvframe.compress(kvframe.build("knorm"), [[1.0]], values)
    with pytest.raises(ConfigError, match=r"statistic 'grad' must be a torch.Tensor; got numpy.ndarray"):
        kvframe.compress(kvframe.build("knorm"), keys, values, stats={"grad": np.zeros((2, 2, 10))})


def test_compress_rejects_dtype_and_device_mismatches():
    keys, values = _kv()
    comp = kvframe.build("snapkv", budget=4, **{"scorer.window": 2})
    q = torch.randn(2, 4, 3, 4)
    with pytest.raises(ConfigError, match=r"values \(torch.float64 on cpu\) must have the dtype and device of keys \(torch.float32 on cpu\); convert with values.to\(keys\)"):
        kvframe.compress(comp, keys, values.double(), q)
    with pytest.raises(ConfigError, match=r"queries \(torch.bfloat16 on cpu\) must have the dtype and device of keys"):
        kvframe.compress(comp, keys, values, q.bfloat16())
    with pytest.raises(ConfigError, match=r"values \(torch.float32 on meta\) must have the dtype and device of keys \(torch.float32 on cpu\)"):
        kvframe.compress(comp, keys, values.to("meta"), q)
    with pytest.raises(ConfigError, match=r"keys must be a floating-point tensor; got dtype torch.int64"):
        kvframe.compress(comp, keys.long(), values.long(), q)
    with pytest.raises(ConfigError, match=r"log_weights has shape \(2, 1, 10\); accepted: \[B, H, T\] = \(2, 2, 10\)"):
        kvframe.compress(comp, keys, values, q, log_weights=torch.zeros(2, 1, 10))


def test_compress_rejects_nan_and_inf():
    keys, values = _kv()
    comp = kvframe.build("snapkv", budget=4, **{"scorer.window": 2})
    q = torch.randn(2, 4, 3, 4)
    bad = values.clone()
    bad[0, 1, 5, 2] = float("nan")
    with pytest.raises(ConfigError, match=r"values contain NaN at row 0, head 1, token 5; kvframe.compress needs finite keys, values and queries"):
        kvframe.compress(comp, keys, bad, q)
    bad = keys.clone()
    bad[1, 0, 3, 0] = float("-inf")
    with pytest.raises(ConfigError, match=r"keys contain inf at row 1, head 0, token 3"):
        kvframe.compress(comp, bad, values, q)
    bad = q.clone()
    bad[1, 3, 2, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"queries contain NaN at row 1, head 3, query 2"):
        kvframe.compress(comp, keys, values, bad)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :2] = False
    bad = keys.clone()
    bad[0, :, 0] = float("nan")  # padding is checked too
    with pytest.raises(ConfigError, match=r"keys contain NaN at row 0, head 0, token 0"):
        kvframe.compress(comp, bad, values, q, valid=valid)
    # large finite values whose sum overflows float16 are accepted
    big = torch.full((1, 1, 4, 2), 60000.0, dtype=torch.float16)
    assert kvframe.compress(kvframe.build("knorm", budget=2), big, big).kept_per_head.tolist() == [[2]]
