"""SnapKV, PyramidKV and AdaKV at budgets below, at and above the observation window.

The window ranks above every earlier token and, within itself, by recency: a budget below the
window keeps its most recent part (always the last prompt token), a budget at or above it keeps the
whole window and the same tokens as a plain top-k with the window at ``+inf`` (the tokens SnapKV and
kvpress keep). AdaKV's per-head floor ``max(floor(alpha * budget_h), 1)`` always holds and the layer
total is exact.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvframe
from kvframe.api import compression_inputs
from kvframe.policies import score_snapkv
from kvframe.policies.select_adaptive_heads import AdaptiveHeadsSelector
from kvframe.policies.select_topk import keep_mask_to_selection, topk_mask
from kvframe.testing import tiny_model

WINDOW = 64
METHODS = ("snapkv", "pyramidkv", "adakv")


# ----------------------------------------------------------------------------- the former behaviour
def _window_at_inf(score, in_window, valid):
    return score.masked_fill(in_window, float("inf"))


def _joint_topk_with_guaranteed_at_inf(self, scores, budgets, state, ctx):
    b, h, t = scores.shape
    valid = state.valid
    guaranteed = topk_mask(scores, torch.floor(budgets.float() * self.alpha).long(), valid)
    s = scores.float().masked_fill(~valid, float("-inf")).masked_fill(guaranteed, float("inf"))
    total = budgets.sum(-1)
    top = s.reshape(b, h * t).topk(min(int(total.max()), h * t), dim=-1).indices
    ok = torch.arange(top.shape[-1]) < total[:, None]
    chosen = torch.zeros(b, h * t, dtype=torch.bool)
    chosen.scatter_(-1, top, ok)
    return keep_mask_to_selection(chosen.reshape(b, h, t) & valid)


@contextlib.contextmanager
def former_behaviour():
    """The scorer and selector as they were: window and guaranteed slots tied at ``+inf``."""
    mp = pytest.MonkeyPatch()
    mp.setattr(score_snapkv, "window_first", _window_at_inf)
    mp.setattr(AdaptiveHeadsSelector, "select", _joint_topk_with_guaranteed_at_inf)
    try:
        yield
    finally:
        mp.undo()


# ----------------------------------------------------------------------------- helpers
def _inputs(t, h=4, g=2, b=2, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, t, d, generator=gen)
    values = torch.randn(b, h, t, d, generator=gen)
    queries = torch.randn(b, h * g, t, d, generator=gen)  # a prefill: every token queries
    return keys, values, queries


def _compress(comp, keys, values, queries, layer_idx=0, num_layers=4):
    state, ctx = compression_inputs(comp, keys, values, queries, layer_idx=layer_idx, num_layers=num_layers)
    budgets = comp.budgets(state, ctx)
    res = kvframe.compress(comp, keys, values, queries, layer_idx=layer_idx, num_layers=num_layers)
    return res, budgets


def _raw_scores(comp, keys, values, queries, layer_idx=0, num_layers=4):
    """The SnapKV scores before the window ranking, window slots at ``+inf``."""
    state, ctx = compression_inputs(comp, keys, values, queries, layer_idx=layer_idx, num_layers=num_layers)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(score_snapkv, "window_first", _window_at_inf)
        return comp.scorer.score(state, ctx)


def assert_same_tokens_up_to_ties(new, old, raw):
    """Each row keeps the same multiset of scores in both versions (the same tokens, except that
    among tokens with exactly equal scores at the budget boundary torch.topk may pick others), and
    each head the same number of slots."""
    assert torch.equal(new.kept_per_head, old.kept_per_head)
    for b in range(raw.shape[0]):
        scores = [raw[b, h, new.head(b, h)[2]] for h in range(raw.shape[1])]
        old_scores = [raw[b, h, old.head(b, h)[2]] for h in range(raw.shape[1])]
        assert torch.equal(torch.cat(scores).sort().values, torch.cat(old_scores).sort().values)


def _kept(res, b, h):
    return res.head(b, h)[2].tolist()


def _floor(budget, alpha=0.2):
    return min(max(math.floor(budget * alpha), min(budget, 1)), budget)


def check_window_rules(method, res, budgets, t, window):
    """The assertions every method and budget must satisfy (see module docstring)."""
    n_window = min(window, t)
    kept = res.kept_per_head
    b_rows, heads = kept.shape
    if method == "adakv":
        assert torch.equal(kept.sum(-1), budgets.sum(-1)), "AdaKV keeps exactly the layer total"
    else:
        assert torch.equal(kept, budgets), "every head keeps exactly its budget"
    for b in range(b_rows):
        for h in range(heads):
            pos = _kept(res, b, h)
            budget = int(budgets[b, h])
            assert pos == sorted(set(pos))
            assert t - 1 in pos, f"row {b} head {h} lost the last prompt token"
            # the kept window tokens are its most recent ones
            in_window = [p for p in pos if p >= t - n_window]
            assert in_window == list(range(t - len(in_window), t))
            if method == "adakv":
                floor = _floor(budget)
                assert len(pos) >= floor and pos[-floor:] == list(range(t - floor, t))
            else:
                assert len(in_window) == min(budget, n_window)


# ----------------------------------------------------------------------------- plain tensors
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("t", [48, 64, 128, 300])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_budgets_around_the_window_on_plain_tensors(method, t, ratio):
    comp = kvframe.build(method, budget=ratio, **{"scorer.window": WINDOW})
    keys, values, queries = _inputs(t, seed=t)
    for layer in (0, 3):  # pyramidkv: the largest and the smallest layer budget
        res, budgets = _compress(comp, keys, values, queries, layer_idx=layer)
        check_window_rules(method, res, budgets, t, WINDOW)
        if int(budgets.max()) < min(WINDOW, t) and method != "adakv":
            # below the window: exactly the most recent tokens
            for b in range(2):
                for h in range(4):
                    n = int(budgets[b, h])
                    assert _kept(res, b, h) == list(range(t - n, t))
        if int(budgets.min()) >= min(WINDOW, t):
            with former_behaviour():
                old, _ = _compress(comp, keys, values, queries, layer_idx=layer)
            # random keys have no exact score ties: the very same tokens as before
            assert torch.equal(res.positions, old.positions) and torch.equal(res.valid, old.valid)


def test_adakv_below_the_window_shares_the_window_between_heads():
    """64 tokens at budget 0.5 (32 per head, below the 64-token window): the window ties across heads
    used to let a head keep nothing; now every head keeps a recent suffix, within one slot of the others."""
    comp = kvframe.build("adakv", budget=0.5, **{"scorer.window": WINDOW})
    keys, values, queries = _inputs(64, h=3, g=3, seed=7)
    res, budgets = _compress(comp, keys, values, queries)
    assert budgets.tolist() == [[32, 32, 32]] * 2
    kept = res.kept_per_head
    assert kept.sum(-1).tolist() == [96, 96]
    assert int(kept.min()) >= 6 and int(kept.max() - kept.min()) <= 1
    for b in range(2):
        for h in range(3):
            n = int(kept[b, h])
            assert _kept(res, b, h) == list(range(64 - n, 64))


def test_adakv_floor_holds_for_every_head_whatever_the_scores():
    """Constant scores (every slot tied): each head still keeps its floor, the total is exact."""
    from kvframe.policies.base import CompressionContext
    from kvframe.slots import SlotState

    state = SlotState.from_tensors(torch.zeros(2, 5, 40, 4), torch.zeros(2, 5, 40, 4))
    budgets = torch.tensor([[1, 2, 10, 20, 30], [3, 3, 3, 3, 3]])
    for scores in (torch.zeros(2, 5, 40), torch.full((2, 5, 40), float("-inf"))):
        sel = AdaptiveHeadsSelector().select(scores, budgets, state, CompressionContext())
        kept = sel.keep_valid.sum(-1)
        assert kept.sum(-1).tolist() == budgets.sum(-1).tolist()
        floors = torch.tensor([[_floor(int(x)) for x in row] for row in budgets])
        assert bool((kept >= floors).all())


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 160),
    window=st.integers(1, 80),
    h=st.integers(1, 4),
    budget=st.one_of(st.floats(0.01, 1.0), st.integers(1, 160)),
    method=st.sampled_from(METHODS),
    alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_property_window_recency_and_floors(t, window, h, budget, method, alpha, seed):
    if isinstance(budget, int):
        budget = min(budget, t)
    overrides = {"scorer.window": window}
    if method == "adakv":
        overrides["selector.alpha"] = alpha
    comp = kvframe.build(method, budget=budget, **overrides)
    keys, values, queries = _inputs(t, h=h, g=2, seed=seed)
    res, budgets = _compress(comp, keys, values, queries, layer_idx=seed % 4)
    n_window = min(window, t)
    if method == "adakv":
        res_budgets = budgets
        check_window_rules_alpha(res, res_budgets, t, n_window, alpha)
    else:
        check_window_rules(method, res, budgets, t, window)
    if int(budgets.min()) >= n_window:
        with former_behaviour():
            old, _ = _compress(comp, keys, values, queries, layer_idx=seed % 4)
        # short prompts can tie exactly (a pooling kernel covering every token before the window)
        assert_same_tokens_up_to_ties(res, old, _raw_scores(comp, keys, values, queries, layer_idx=seed % 4))


def check_window_rules_alpha(res, budgets, t, n_window, alpha):
    kept = res.kept_per_head
    assert torch.equal(kept.sum(-1), budgets.sum(-1))
    for b in range(kept.shape[0]):
        for h in range(kept.shape[1]):
            pos = _kept(res, b, h)
            floor = _floor(int(budgets[b, h]), alpha)
            assert len(pos) >= floor >= 1
            assert t - 1 in pos
            in_window = [p for p in pos if p >= t - n_window]
            assert in_window == list(range(t - len(in_window), t))
            assert len(in_window) >= min(floor, n_window)


# ----------------------------------------------------------------------------- through attach
def _prefill_states(model, comp, t, seed=0, former=False):
    """Per layer: the slot state after the prefill, and the scores before the window ranking."""
    ids = torch.randint(3, 128, (2, t), generator=torch.Generator().manual_seed(seed))
    raw = []
    rank = _window_at_inf if former else score_snapkv.window_first

    def spy(score, in_window, valid):
        raw.append(score.masked_fill(in_window, float("inf")))
        return rank(score, in_window, valid)

    with contextlib.ExitStack() as stack:
        if former:
            stack.enter_context(former_behaviour())
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(score_snapkv, "window_first", spy)
        with torch.no_grad(), kvframe.attach(model, comp) as handle:
            model(ids, attention_mask=torch.ones_like(ids))
    assert all(layer.compressions == 1 for layer in handle.cache.layers)
    return [layer.state for layer in handle.cache.layers], raw


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("t", [48, 64, 128, 300])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_budgets_around_the_window_through_attach(method, t, ratio):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
    comp = kvframe.build(method, budget=ratio, **{"scorer.window": WINDOW})
    states, raw = _prefill_states(model, comp, t)
    budget = max(1, math.floor(t * ratio + 0.5))
    for layer, state in enumerate(states):
        kept = state.valid.sum(-1)
        if method == "snapkv":
            assert kept.tolist() == [[budget] * 4] * 2
        if method == "adakv":
            assert kept.sum(-1).tolist() == [budget * 4] * 2
            assert int(kept.min()) >= _floor(budget)
        for b in range(2):
            for h in range(4):
                pos = state.positions[b, h][state.valid[b, h]].tolist()
                assert t - 1 in pos, f"{method} layer {layer} row {b} head {h} lost the last prompt token"
                in_window = [p for p in pos if p >= t - min(WINDOW, t)]
                assert in_window == list(range(t - len(in_window), t))
                if method != "adakv":
                    assert len(in_window) == min(len(pos), WINDOW, t)
    if budget >= min(WINDOW, t):
        # the same tokens as before, up to exact float ties at the budget boundary (the tiny random
        # model's attention is nearly uniform), where torch.topk's pick is arbitrary in both versions
        old_states, old_raw = _prefill_states(model, comp, t, former=True)
        for new_state, old_state, score, old_score in zip(states, old_states, raw, old_raw):
            assert torch.equal(score, old_score)
            assert torch.equal(new_state.valid.sum(-1), old_state.valid.sum(-1))
            for b in range(2):
                for h in range(4):
                    new_pos = new_state.positions[b, h][new_state.valid[b, h]]
                    old_pos = old_state.positions[b, h][old_state.valid[b, h]]
                    assert torch.equal(score[b, h, new_pos].sort().values, score[b, h, old_pos].sort().values)


@pytest.mark.slow
def test_adakv_smollm2_keeps_every_head_at_a_budget_below_the_window(smollm2):
    """The reported case: a 64-token prompt at budget 0.5 on SmolLM2 (3 KV heads per layer) left one
    KV head with no slot at all."""
    model, tok = smollm2
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    ids = tok(text, return_tensors="pt").input_ids[:, :64]
    assert ids.shape[1] == 64
    with torch.no_grad(), kvframe.attach(model, kvframe.build("adakv", budget=0.5)) as handle:
        model(ids)
    for layer in handle.cache.layers:
        kept = layer.state.valid.sum(-1)
        assert kept.sum(-1).tolist() == [96] and int(kept.min()) >= 6
        for h in range(kept.shape[1]):
            pos = layer.state.positions[0, h][layer.state.valid[0, h]].tolist()
            assert pos == list(range(64 - len(pos), 64))
