"""Decode-time methods: WeightedKV (docs/methods.md#weightedkv), H2O, TOVA, CaM and StreamingLLM during
decoding. Values on plain tensors, and exact capacities through generate() on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvframe
from kvframe.errors import ConfigError
from kvframe.testing import tiny_model
from kvframe.policies.base import Selection
from kvframe.policies.groups import fold_right, kept_assign
from kvframe.policies.merge_convex import convex_merge
from tests.cards.table import names
from tests.conftest import left_padded

DECODE_METHODS = names(family="decode")


def _attn(q, k, v, bias=None):
    s = k @ q / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    return torch.softmax(s, dim=-1) @ v


# ----------------------------------------------------------------------------- WeightedKV math
def test_weightedkv_ideal_merge_is_exact():
    torch.manual_seed(0)
    t, d = 12, 16
    q, k, v = torch.randn(d, dtype=torch.float64), torch.randn(t, d, dtype=torch.float64), torch.randn(t, d, dtype=torch.float64)
    e = torch.exp(k @ q / math.sqrt(d))
    z = e.sum()
    r = e[0] / e[1]
    v_tilde = (1 - e[0] / z) * (r * v[0] + v[1]) - (r / z) * (e[2:, None] * v[2:]).sum(0)
    full = _attn(q, k, v)
    merged = _attn(q, k[1:], torch.cat([v_tilde[None], v[2:]]))
    assert torch.allclose(full, merged, atol=1e-12)


def test_weightedkv_paper_example_one_sixth():
    """Scores 0.1 and 0.5: v3 <- v2/6 + 5 v3/6 (Fig. 3)."""
    v = torch.randn(1, 1, 4, 8)
    weights = torch.tensor([[[0.9, 0.1, 0.5, 0.7]]])
    sel = fold_right(Selection(keep=torch.tensor([[[0, 2, 3]]]), keep_valid=torch.ones(1, 1, 3, dtype=torch.bool)), torch.ones(1, 1, 4, dtype=torch.bool))
    assert sel.assign.tolist() == [[[0, 1, 1, 2]]]
    out = convex_merge(v, weights, sel.assign, v[:, :, [0, 2, 3]])
    assert torch.allclose(out[0, 0, 1], v[0, 0, 1] / 6 + 5 * v[0, 0, 2] / 6, atol=1e-6)
    assert torch.equal(out[0, 0, 0], v[0, 0, 0]) and torch.equal(out[0, 0, 2], v[0, 0, 3])


@settings(max_examples=50, deadline=None)
@given(a=st.one_of(st.just(0.0), st.floats(1e-6, 10.0)), b=st.one_of(st.just(0.0), st.floats(1e-6, 10.0)), seed=st.integers(0, 2**16))
def test_convex_merge_is_a_convex_combination(a, b, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 1, 2, 6, generator=g)
    assign = torch.tensor([[[0, 0]]])
    out = convex_merge(v, torch.tensor([[[a, b]]]), assign, v[:, :, 1:])[0, 0, 0]
    if a + b == 0 or a == 0:
        assert torch.allclose(out, v[0, 0, 1], atol=1e-6)  # no weight on the evicted token: neighbour unchanged
        return
    lam = a / (a + b)
    assert torch.allclose(out, lam * v[0, 0, 0] + (1 - lam) * v[0, 0, 1], atol=1e-5)
    lo, hi = torch.minimum(v[0, 0, 0], v[0, 0, 1]), torch.maximum(v[0, 0, 0], v[0, 0, 1])
    assert bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())


def test_convex_merge_error_vanishes_with_the_evicted_weight():
    """As the evicted token's attention goes to 0, the convex merge's output error goes to 0."""
    torch.manual_seed(1)
    d, t = 16, 10
    q, k, v = torch.randn(d, dtype=torch.float64), torch.randn(t, d, dtype=torch.float64), torch.randn(t, d, dtype=torch.float64)
    errors = []
    for shift in [0.0, -4.0, -8.0, -16.0]:
        k2 = k.clone()
        k2[0] = k[0] + shift * q / q.norm() * math.sqrt(d) / q.norm()  # lower the logit of token 0
        e = torch.exp(k2 @ q / math.sqrt(d))
        merged_v = (e[0] * v[0] + e[1] * v[1]) / (e[0] + e[1])
        full = _attn(q, k2, v)
        approx = _attn(q, k2[1:], torch.cat([merged_v[None], v[2:]]))
        errors.append((full - approx).norm().item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-5 * max(errors[0], 1e-12) + 1e-9


def test_fold_right_leaves_trailing_slots_dropped_and_skips_padding():
    valid = torch.tensor([[[False, True, True, True, True, True]]])
    sel = Selection(keep=torch.tensor([[[2, 4]]]), keep_valid=torch.ones(1, 1, 2, dtype=torch.bool))
    out = fold_right(sel, valid)
    assert out.assign.tolist() == [[[-1, 0, 0, 1, 1, -1]]]
    assert kept_assign(sel.keep, sel.keep_valid, 6).tolist() == [[[-1, -1, 0, -1, 1, -1]]]


# ----------------------------------------------------------------------------- capacities in generate
def _run(method, budget, n_new=12, arch="llama", pads=(0, 5)):
    model = tiny_model(arch)
    ids, mask = left_padded(len(pads), 40, list(pads))
    comp = kvframe.build(method, budget=budget)
    sizes = []
    with kvframe.attach(model, comp) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        cache = handle.cache
    for layer in cache.layers:
        sizes.append(layer.state.content_slots())
    return model, ids, mask, out, cache, sizes


@pytest.mark.parametrize("method", DECODE_METHODS)
@pytest.mark.parametrize("budget", [16, 0.5])
def test_decode_methods_hold_exactly_their_capacity(method, budget):
    _, ids, mask, out, cache, sizes = _run(method, budget)
    prompt = mask.sum(-1)  # [B]
    want = torch.full_like(prompt, 16) if isinstance(budget, int) else torch.floor(prompt * budget + 0.5).long()
    for s in sizes:
        assert torch.equal(s, want[:, None].expand_as(s)), (s, want)
    assert cache.layers[0].compressions >= 11  # the trigger fired at every decode step


def test_decode_capacity_is_constant_step_by_step():
    model = tiny_model("mistral")
    ids, mask = left_padded(1, 30, [0])
    comp = kvframe.build("weightedkv", budget=12)
    with kvframe.attach(model, comp):
        cache = kvframe.SlotCache.for_model(model, comp)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            assert int(cache.layers[0].state.content_slots().max()) == 12
            nxt = out.logits[:, -1:].argmax(-1)
            m = mask
            for _ in range(5):
                m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
                out = model(nxt, attention_mask=m, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                assert [int(layer.state.content_slots().max()) for layer in cache.layers] == [12] * len(cache.layers)


def test_weightedkv_protects_sinks_and_recent_and_counts_age():
    _, ids, mask, out, cache, _ = _run("weightedkv", 16, n_new=10, pads=(0,))
    for layer in cache.layers:
        st = layer.state
        pos = st.positions[0]  # [H, S]
        # sinks (first 4 prompt tokens) and the 4 most recent tokens never leave
        for h in range(pos.shape[0]):
            have = set(pos[h].tolist())
            assert {0, 1, 2, 3} <= have
            last = int(pos[h].max())
            assert {last - i for i in range(4)} <= have
        # age counts the steps since the slot entered: next position - own position
        age = st.stats["age"][0]
        expected = (layer.next_position[0] - pos).float()
        assert torch.equal(age, expected)


def test_h2o_accumulated_attention_sums_to_query_count_before_eviction():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (1, 30))
    comp = kvframe.build("h2o_decode", budget=1.0)
    with kvframe.attach(model, comp) as handle, torch.no_grad():
        model(ids)
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in handle.cache.layers:
        total = layer.state.stats["attn"].sum(-1)
        assert torch.allclose(total, torch.full_like(total, 30.0 * g), rtol=1e-5)


def test_h2o_decode_keeps_heavy_hitters_and_recent_half():
    _, ids, mask, out, cache, _ = _run("h2o_decode", 16, n_new=6, pads=(0,))
    for layer in cache.layers:
        pos = layer.state.positions[0]
        for h in range(pos.shape[0]):
            last = int(pos[h].max())
            assert {last - i for i in range(8)} <= set(pos[h].tolist())  # recent half protected


def test_cam_spreads_value_mass_and_is_reproducible():
    from kvframe.policies.merge_cam import CaMValueMerge
    from kvframe.policies.base import CompressionContext
    from kvframe.slots import SlotState

    torch.manual_seed(0)
    v = torch.randn(1, 1, 8, 4)
    state = SlotState.from_tensors(torch.randn(1, 1, 8, 4), v)
    state = state.with_stats(attn=torch.tensor([[[1.0, 1, 50.0, 1, 1, 1, 1, 1]]]))  # slot 2: p = 1
    keep = torch.tensor([[[0, 1, 3, 4, 5, 6, 7]]])
    sel = Selection(keep=keep, keep_valid=torch.ones_like(keep, dtype=torch.bool))
    kept = state.gather(sel.keep, sel.keep_valid)
    merge = CaMValueMerge(m=3)
    ctx = CompressionContext(generator=torch.Generator().manual_seed(0))
    values, _ = merge.merge(state, sel, kept, ctx)
    delta = values - kept.values
    assert torch.allclose(delta[0, 0, 2:5], (v[0, 0, 2] / 3).expand(3, 4), atol=1e-6)  # next 3 kept slots
    assert torch.allclose(delta.sum(2), v[:, :, 2], atol=1e-6)  # the whole value is spread
    assert torch.equal(delta[0, 0, :2], torch.zeros(2, 4)) and torch.equal(delta[0, 0, 5:], torch.zeros(2, 4))
    # p = 0 when the evicted token got no attention
    state0 = state.with_stats(attn=torch.tensor([[[1.0, 1, 0.0, 1, 1, 1, 1, 1]]]))
    values0, _ = merge.merge(state0, sel, state0.gather(sel.keep, sel.keep_valid), ctx)
    assert torch.equal(values0, kept.values)


def test_cam_generation_is_seeded():
    a = _run("cam", 16, n_new=8)[3]
    b = _run("cam", 16, n_new=8)[3]
    assert torch.equal(a, b)


def test_streaming_llm_decode_reindexes_positions():
    _, ids, mask, out, cache, _ = _run("streaming_llm_decode", 12, n_new=8, pads=(0,))
    for layer in cache.layers:
        pos = layer.state.positions[0]  # evicted in place: stored out of order, renumbered by position
        assert torch.equal(pos.sort(-1).values, torch.arange(12).expand_as(pos))


def test_decode_ratio_budget_refers_to_prompt_length():
    _, ids, mask, out, cache, sizes = _run("tova_decode", 0.25, n_new=10, pads=(0, 8))
    assert torch.equal(sizes[0][:, 0], torch.tensor([10, 8]))


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"scorer": {"name": "accumulated_attention", "recent": 1.5}}, "recent"),
        ({"scorer": {"name": "accumulated_attention", "n_sink": -1}}, "n_sink"),
        ({"scorer": "knorm", "value_merge": {"name": "convex", "weights": "max"}}, "weights"),
        ({"scorer": "knorm", "value_merge": {"name": "cam", "m": 0}}, "m"),
        ({"scorer": "knorm", "selector": {"name": "topk", "fold": "left"}}, "fold"),
        ({"scorer": "knorm", "trigger": {"name": "decode", "every": 0}}, "every"),
        ({"scorer": "knorm", "trigger": {"name": "per_chunk", "scoring_pass": "twice"}}, "scoring_pass"),
    ],
)
def test_bad_hyperparameters_name_the_field(spec, field):
    with pytest.raises(ConfigError, match=field):
        kvframe.build(spec)
