"""In-place eviction during decoding (docs/architecture.md, "In-place eviction").

Decode-time cards drop one slot per step by overwriting it, so the store's slots stop being in
position order. What must not change is what the cache holds: the kept positions and the model's
logits equal those of the dense reference path (every firing gathers the kept slots from the
layer's full state), and a step moves O(1) slots whatever the cache size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvframe
import kvframe.compressor as compressor_module
from kvframe.policies.base import Selection
from kvframe.policies.groups import fold_right, protected_mask, valid_rank
from kvframe.slots import Eviction, SlotState, position_order
from kvframe.store import SlotStore
from kvframe.testing import tiny_model
from tests.cards.table import names
from tests.conftest import left_padded

DECODE_METHODS = names(family="decode")


def _generate(model, method, budget, ids, mask, n_new, dense, **overrides):
    """Greedy generation; ``dense``: the reference path (no firing evicts in place)."""
    with pytest.MonkeyPatch.context() as mp:
        if dense:
            mp.setattr(compressor_module, "IN_PLACE_MAX", 0)
        comp = kvframe.build(method, budget=budget, **overrides)
        with torch.no_grad(), kvframe.attach(model, comp) as handle:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores), handle.cache


def _kept_positions(cache) -> list[list[list[list[int]]]]:
    """Per layer, row and head: the sorted content positions."""
    out = []
    for layer in cache.layers:
        st = layer.state
        out.append([[sorted(st.positions[b, h][st.valid[b, h]].tolist()) for h in range(st.num_heads)] for b in range(st.batch_size)])
    return out


def test_decode_cards_evict_in_place():
    assert DECODE_METHODS, "the card table lists decode-time cards"
    for method in DECODE_METHODS:
        assert kvframe.build(method).evicts_in_place, method
    # a merge that needs the whole layer never evicts in place
    assert not kvframe.build("kvslimmer").evicts_in_place


@pytest.mark.parametrize("arch,budget", [("llama", 16), ("llama", 0.5), ("gemma3", 16), ("qwen2", 0.5)])
@pytest.mark.parametrize("method", DECODE_METHODS)
def test_in_place_equals_the_dense_reference(arch, method, budget):
    model = tiny_model(arch)
    ids, mask = left_padded(2, 40, [0, 5])
    seq, logits, cache = _generate(model, method, budget, ids, mask, 16, dense=False)
    ref_seq, ref_logits, ref_cache = _generate(model, method, budget, ids, mask, 16, dense=True)
    assert torch.equal(seq, ref_seq)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)
    assert _kept_positions(cache) == _kept_positions(ref_cache)
    # the dense path gathers the layer at every step; in place moves a few slots per step
    i = next(i for i, layer in enumerate(cache.layers) if not layer.is_sliding)
    if kvframe.build(method).positions != "reindex":  # re-index rewrites every key that moves, in both paths
        assert cache.layers[i].store.copied_slots < ref_cache.layers[i].store.copied_slots
    # and the slots really are out of position order (so the equality above means something)
    st_ = cache.layers[i].state
    assert not torch.equal(position_order(st_.valid, st_.positions), torch.arange(st_.num_slots).expand_as(st_.positions))


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_in_place_equals_the_dense_reference_with_beam_search(method):
    model = tiny_model("llama")
    ids, mask = left_padded(1, 32, [0])
    outs = []
    for dense in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if dense:
                mp.setattr(compressor_module, "IN_PLACE_MAX", 0)
            with torch.no_grad(), kvframe.attach(model, kvframe.build(method, budget=12)):
                outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", ["tova_decode", "h2o_decode", "weightedkv", "cam"])
def test_one_eviction_moves_o1_slots_whatever_the_cache_size(method):
    """Per decode step the store copies at most (merge targets + 1 moved slot), the same at capacity
    16 and 64; no buffer is allocated once the capacity is reached."""
    model = tiny_model("llama")
    per_step = {}
    for capacity in (16, 64):
        ids, mask = left_padded(1, capacity + 8, [0])
        comp = kvframe.build(method, budget=capacity)
        with torch.no_grad(), kvframe.attach(model, comp):
            cache = kvframe.SlotCache.for_model(model, comp)
            out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            m = mask
            out = model(nxt, attention_mask=(m := torch.cat([m, torch.ones_like(nxt)], -1)), past_key_values=cache, use_cache=True)
            store = cache.layers[0].store
            copied, allocations = store.copied_slots, store.allocations
            steps = 12
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)
                m = torch.cat([m, torch.ones_like(nxt)], -1)
                out = model(nxt, attention_mask=m, past_key_values=cache, use_cache=True)
                assert int(cache.layers[0].state.content_slots().max()) == capacity
            assert store.allocations == allocations
            per_step[capacity] = (store.copied_slots - copied) / steps
    reach = comp.value_merge.in_place_reach() or 0
    bound = 1 + max(reach, 1 if comp.selector.to_dict().get("fold") == "right" else 0)
    assert per_step[16] <= bound and per_step[64] <= bound, per_step


@settings(max_examples=60, deadline=None)
@given(t=st.integers(2, 24), seed=st.integers(0, 2**16), n_sink=st.integers(0, 4), n_recent=st.integers(0, 6))
def test_position_ranks_do_not_depend_on_storage_order(t, seed, n_sink, n_recent):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(1, 2, t, generator=g) < 0.8
    positions = torch.where(valid, torch.cumsum(torch.randint(1, 4, (1, 2, t), generator=g), -1), -1)
    rank, rank_end = valid_rank(valid, positions)
    ref_rank, ref_end = valid_rank(valid)  # ordered storage: slot order is position order
    assert torch.equal(rank[valid], ref_rank[valid]) and torch.equal(rank_end[valid], ref_end[valid])
    perm = torch.randperm(t, generator=g)
    p_rank, _ = valid_rank(valid[..., perm], positions[..., perm])
    assert torch.equal(p_rank[valid[..., perm]], rank[..., perm][valid[..., perm]])
    prot = protected_mask(valid, n_sink, n_recent, positions)
    assert torch.equal(protected_mask(valid[..., perm], n_sink, n_recent, positions[..., perm]), prot[..., perm])
    assert torch.equal(prot, protected_mask(valid, n_sink, n_recent))


@settings(max_examples=60, deadline=None)
@given(t=st.integers(2, 20), seed=st.integers(0, 2**16))
def test_fold_right_goes_right_by_position(t, seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(1, 1, t, generator=g) < 0.9
    positions = torch.where(valid, torch.arange(t), -1)
    kept = valid & (torch.rand(1, 1, t, generator=g) < 0.5)
    from kvframe.policies.select_topk import keep_mask_to_selection

    ref = fold_right(keep_mask_to_selection(kept), valid)
    perm = torch.randperm(t, generator=g)
    sel = keep_mask_to_selection(kept[..., perm])
    out = fold_right(sel, valid[..., perm], positions[..., perm])
    # each slot folds into the kept slot of the same position in both layouts
    ref_target = torch.where(ref.assign >= 0, ref.keep.gather(-1, ref.assign.clamp(min=0)), -1)  # slot = position
    tgt = torch.where(out.assign >= 0, perm[sel.keep.gather(-1, out.assign.clamp(min=0))], -1)
    assert torch.equal(tgt, ref_target[..., perm])


def test_store_evict_keeps_exactly_the_other_slots():
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 3, 12, 4
    store = SlotStore(headroom=1)
    st_ = SlotState.from_tensors(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g))
    store.append(st_)
    store.install(store.view().with_stats(attn=torch.rand(b, h, t, generator=g)))
    view = store.view()
    ref = {(bi, hi, int(view.positions[bi, hi, s])): (view.keys[bi, hi, s].clone(), float(view.stats["attn"][bi, hi, s]))
           for bi in range(b) for hi in range(h) for s in range(t)}
    ev_idx = torch.tensor([[[1], [11], [5]], [[0], [3], [7]]])
    ones = torch.ones_like(ev_idx, dtype=torch.bool)
    empty = torch.zeros(b, h, 0, dtype=torch.long)
    copied = store.copied_slots
    store.evict(Eviction(ev_idx, ones, empty, empty.bool(), view.slice(0), dict(view.stats)))
    assert store.n == t - 1 and store.copied_slots - copied <= 1
    new = store.view()
    for bi in range(b):
        for hi in range(h):
            held = {int(p) for p in new.positions[bi, hi][new.valid[bi, hi]]}
            assert held == set(range(t)) - {int(ev_idx[bi, hi, 0])}
            for s in range(t - 1):
                key, attn = ref[(bi, hi, int(new.positions[bi, hi, s]))]
                assert torch.equal(new.keys[bi, hi, s], key) and float(new.stats["attn"][bi, hi, s]) == attn


def test_evict_copies_a_shared_store_first():
    store = SlotStore(headroom=1)
    st_ = SlotState.from_tensors(torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2))
    store.append(st_)
    fork = store.fork()
    before = fork.view().positions.clone()
    ev = torch.tensor([[[2]]])
    empty = torch.zeros(1, 1, 0, dtype=torch.long)
    store.evict(Eviction(ev, torch.ones_like(ev, dtype=torch.bool), empty, empty.bool(), st_.slice(0)))
    assert torch.equal(fork.view().positions, before) and fork.n == 6  # the fork is untouched
    assert sorted(store.view().positions[0, 0].tolist()) == [0, 1, 3, 4, 5]


def test_selection_on_an_unordered_state_keeps_the_same_positions():
    """Every decode card's compressor, run densely on a permuted state, keeps the same positions
    with the same contents as on the ordered state (the order-free contract)."""
    from kvframe.policies.base import CompressionContext

    g = torch.Generator().manual_seed(3)
    b, h, t, d = 1, 2, 20, 8
    state = SlotState.from_tensors(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g))
    state = state.with_stats(attn=torch.rand(b, h, t, generator=g), age=torch.ones(b, h, t))
    perm = torch.randperm(t, generator=g)
    shuffled = state.gather(perm.expand(b, h, t), torch.ones(b, h, t, dtype=torch.bool))
    q = torch.randn(b, 2 * h, 1, d, generator=g)
    for method in DECODE_METHODS:
        comp = kvframe.build(method, budget=12, compile=False)
        outs = []
        for st_ in (state, shuffled):
            ctx = CompressionContext(queries=q, query_positions=torch.tensor([[t]]), query_valid=torch.ones(1, 1, dtype=torch.bool),
                                     phase="decode", generator=torch.Generator().manual_seed(0), strict=False)
            out = comp.compress(st_, ctx)
            order = position_order(out.valid, out.positions)
            outs.append(out.gather(order, torch.ones_like(order, dtype=torch.bool)))
        assert torch.equal(outs[0].positions, outs[1].positions), method
        assert torch.allclose(outs[0].values, outs[1].values, atol=1e-6), method
        assert torch.equal(outs[0].keys, outs[1].keys), method


@pytest.mark.slow
def test_in_place_equals_the_dense_reference_on_smollm2(smollm2):
    """The real model, a 1k-token prompt, 16 greedy steps at capacity 0.25 of the prompt."""
    from kvframe.eval.tasks.passkey import make_passkey_samples

    model, tok = smollm2
    sample = make_passkey_samples(tok, n=1, length=1024, depths=[0.4], seed=2)[0]
    ids = tok(sample.context + "\n" + sample.question, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    for method in DECODE_METHODS:
        seq, logits, cache = _generate(model, method, 0.25, ids, mask, 16, dense=False)
        ref_seq, ref_logits, ref_cache = _generate(model, method, 0.25, ids, mask, 16, dense=True)
        assert torch.equal(seq, ref_seq), method
        # logits reach ~25 here: slots summed in another order differ by float rounding (measured at most 3.1e-5)
        assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=0), (method, (logits - ref_logits).abs().max())
        assert _kept_positions(cache) == _kept_positions(ref_cache), method


def test_store_evict_general_path_with_holes_and_several_slots():
    """Two slots per head, a head that evicts one (padding entry), a row with empty slots: every
    head keeps exactly its other slots and the store shrinks to the longest head."""
    g = torch.Generator().manual_seed(1)
    b, h, t, d = 2, 2, 10, 3
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 7:] = False  # row 1 holds 7 slots (an earlier compression's padding tail)
    st_ = SlotState.from_tensors(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g), valid=valid)
    store = SlotStore()
    store.append(st_)
    view = store.view()
    keys = {(bi, hi, int(view.positions[bi, hi, s])): view.keys[bi, hi, s].clone() for bi in range(b) for hi in range(h) for s in range(t) if view.valid[bi, hi, s]}
    ev = torch.tensor([[[2, 9], [0, 0]], [[1, 5], [6, 0]]])
    ev_ok = torch.tensor([[[True, True], [True, False]], [[True, True], [True, False]]])
    empty = torch.zeros(b, h, 0, dtype=torch.long)
    store.evict(Eviction(ev, ev_ok, empty, empty.bool(), view.slice(0)))
    new = store.view()
    assert store.n == 9  # row 0 head 1 keeps 9 slots
    for bi in range(b):
        for hi in range(h):
            gone = {int(e) for e, ok in zip(ev[bi, hi], ev_ok[bi, hi]) if ok}
            want = {p for (bb, hh, p) in keys if (bb, hh) == (bi, hi)} - gone
            held = new.positions[bi, hi][new.valid[bi, hi]].tolist()
            assert sorted(held) == sorted(want)
            for s in range(store.n):
                if new.valid[bi, hi, s]:
                    assert torch.equal(new.keys[bi, hi, s], keys[(bi, hi, int(new.positions[bi, hi, s]))])


@pytest.mark.parametrize("per_head_qpos", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_fused_decode_attention_equals_attention_and_mass(per_head_qpos, window):
    """The decode step's one-softmax path gives the slot attention's output and attention_mass's
    statistics (padding slots, log-weights, an invalid query, sliding window, per-head positions)."""
    from kvframe.kernels.decode import slot_attention_reference
    from kvframe.stats import attention_mass, decode_attention_with_mass

    g = torch.Generator().manual_seed(5)
    b, h, gq, t, d = 2, 2, 3, 11, 8
    valid = torch.rand(b, h, t, generator=g) < 0.8
    positions = torch.where(valid, torch.randperm(t, generator=g).expand(b, h, t), -1)
    state = SlotState(torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g), positions,
                      torch.where(valid, torch.rand(b, h, t, generator=g), 0.0), valid)
    query = torch.randn(b, h * gq, 1, d, generator=g)
    qpos = torch.full((b, h, 1), t) if per_head_qpos else torch.full((b, 1), t)
    qvalid = torch.tensor([[True], [False]])
    out, mass, seen = decode_attention_with_mass(query, state, qpos, qvalid, 0.3, window)
    ref_out = slot_attention_reference(query, state.keys, state.values, state.log_weights, state.positions, state.valid, qpos, 0.3, window)
    ref_mass, ref_seen = attention_mass(state, query, qpos if not per_head_qpos else qpos, qvalid, 0.3, window)
    assert torch.allclose(out[0], ref_out[0], atol=1e-6)  # row 1's query is padding: its output is unused
    assert torch.allclose(mass, ref_mass, atol=1e-6) and torch.equal(seen, ref_seen)
    if not per_head_qpos:  # what the compressor's context takes as window_scores(state, 1)
        from kvframe.kernels.window import window_scores_reference

        ws = window_scores_reference(query, state.keys, state.log_weights, state.positions, state.valid, qpos, qvalid, 0.3, window)
        assert torch.allclose(mass / gq, ws, atol=1e-6)
