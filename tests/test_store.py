"""kvframe.store: preallocated slot buffers, appends in place, copy-on-write forks, exact installs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvframe
from kvframe.attach import cache_argument
from kvframe.codecs import FpCodec, get_codec
from kvframe.errors import ConfigError
from kvframe.slots import SlotState
from kvframe.store import MIN_GROWTH, SlotStore
from kvframe.testing import tiny_model
from tests.conftest import left_padded


def _slots(t: int, start: int = 0, b: int = 2, h: int = 3, d: int = 4, seed: int = 0) -> SlotState:
    g = torch.Generator().manual_seed(seed)
    return SlotState.from_tensors(
        torch.randn(b, h, t, d, generator=g),
        torch.randn(b, h, t, d + 1, generator=g),
        positions=torch.arange(start, start + t),
    )


def _equal(a: SlotState, b: SlotState) -> bool:
    fields = ("keys", "values", "positions", "log_weights", "valid")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields) and a.stats.keys() == b.stats.keys() and all(
        torch.equal(a.stats[k], b.stats[k]) for k in a.stats
    )


def test_appends_write_into_free_capacity_in_place():
    store = SlotStore()
    store.append(_slots(10))
    store.append(_slots(1, 10, seed=1))  # the first growth: capacity 10 -> 10 + 64
    assert store.capacity == 10 + MIN_GROWTH and store.n == 11 and store.allocations == 2
    ptrs = {k: t.data_ptr() for k, t in store.parts.items()}
    for i in range(11, 10 + MIN_GROWTH):
        view = store.append(_slots(1, i, seed=i))
        assert {k: t.data_ptr() for k, t in store.parts.items()} == ptrs  # no new buffer
        assert view.keys.data_ptr() == ptrs["keys.data"]  # the view reads the buffer itself
    assert store.allocations == 2 and store.copied_slots == 10  # only the one growth copied
    assert store.view().positions[0, 0].tolist() == list(range(10 + MIN_GROWTH))


def test_growth_is_geometric():
    store = SlotStore()
    store.append(_slots(100))
    for i in range(2000):
        store.append(_slots(1, 100 + i))
    # capacity grows by a quarter (at least 64 slots): ~log_1.25(21) growths, not one per token
    assert store.allocations <= 16
    assert store.copied_slots < 5 * 2100  # amortised O(1) copies per appended slot
    assert store.n == 2100 <= store.capacity <= 2100 * 1.25 + 64


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["append", "keep", "reorder", "stats"]), st.integers(1, 9)), min_size=1, max_size=12),
       headroom=st.integers(0, 4))
def test_store_equals_a_dense_reference(ops, headroom):
    """Any sequence of appends, compressions (gathers), batch reorders and stats updates leaves the
    store's view equal to the same operations on plain dense states (concatenation and gather)."""
    store = SlotStore(headroom=headroom)
    ref = _slots(5)
    store.append(ref)
    seen = 5
    for i, (op, k) in enumerate(ops):
        cur = store.view()
        if op == "append":
            new = _slots(k, seen, seed=i + 1)
            new.stats = {s: v.new_zeros(2, 3, k, *v.shape[3:]) for s, v in ref.stats.items()}
            ref = ref.cat(new)
            seen += k
            store.append(_slots(k, seen - k, seed=i + 1))
        elif op == "keep":  # keep the k highest positions of every head (a compression)
            k = min(k, ref.num_slots)
            idx = torch.arange(ref.num_slots - k, ref.num_slots).expand(2, 3, k)
            ok = torch.ones(2, 3, k, dtype=torch.bool)
            ref = ref.gather(idx, ok)
            store.install(cur.gather(idx, ok))
        elif op == "reorder":
            ref = ref.index_batch(torch.tensor([1, 0]))
            store.install(cur.index_batch(torch.tensor([1, 0])))
        else:
            mass = torch.full((2, 3, ref.num_slots), float(k))
            ref = ref.with_stats(attn=mass)
            store.install(cur.with_stats(attn=mass.clone()))
        assert _equal(store.view(), ref)
        assert store.capacity >= store.n == ref.num_slots


def test_install_copies_into_fitting_buffers_and_releases_the_rest():
    # headroom 1 (a decode-time trigger evicting one slot per step): append 1, compress back, no allocation
    store = SlotStore(headroom=1)
    store.append(_slots(40))
    first = store.view()
    idx = torch.arange(20).expand(2, 3, 20)
    store.install(first.gather(idx, torch.ones(2, 3, 20, dtype=torch.bool)))
    assert store.n == 20 and store.capacity == 21  # memory released: kept + headroom
    ptrs, allocs = store.parts["keys.data"].data_ptr(), store.allocations
    for step in range(30):
        view = store.append(_slots(1, 40 + step, seed=step))
        keep = torch.arange(1, 21).expand(2, 3, 20)  # evict the oldest
        store.install(view.gather(keep, torch.ones(2, 3, 20, dtype=torch.bool)))
        assert store.parts["keys.data"].data_ptr() == ptrs and store.allocations == allocs
    assert store.view().positions[0, 0].tolist() == list(range(50, 70))
    # headroom 0: the compressor's freshly gathered tensors are adopted as the buffers (no copy)
    plain = SlotStore()
    plain.append(_slots(40))
    kept = plain.view().gather(idx, torch.ones(2, 3, 20, dtype=torch.bool))
    plain.install(kept)
    assert plain.view().keys.data_ptr() == kept.keys.data_ptr() and plain.capacity == 20 and plain.reserved_bytes() == 0


def test_install_of_a_view_into_its_own_buffers():
    """A policy may return a slice of the slots it got (a view of the buffers): copied out first."""
    store = SlotStore(headroom=2)
    store.append(_slots(12))
    view = store.view()
    want = view.slice(10)
    want = SlotState(*(t.clone() for t in (want.keys, want.values, want.positions, want.log_weights, want.valid)))
    store.install(view.slice(10).replace(keys=view.keys[:, :, 2:12]))  # shifted view: overlapping storage
    assert torch.equal(store.view().keys, _slots(12).keys[:, :, 2:12])
    assert torch.equal(store.view().values, want.values)


def test_fork_is_copy_on_write():
    store = SlotStore()
    store.append(_slots(8))
    store.append(_slots(1, 8, seed=1))  # free capacity now: an append would write in place
    before = store.view().keys.clone()
    fork = store.fork()
    assert store.shared and fork.shared and fork.parts["keys.data"] is store.parts["keys.data"]
    fork.append(_slots(1, 9, seed=2))
    assert fork.parts["keys.data"].data_ptr() != store.parts["keys.data"].data_ptr()  # copied before writing
    assert torch.equal(store.view().keys, before) and store.n == 9 and fork.n == 10
    second = store.fork()
    second.append(_slots(1, 9, seed=3))  # a second fork appending at the same slot: no interference
    assert torch.equal(fork.view().keys[:, :, 9], _slots(1, 9, seed=2).keys[:, :, 0])
    assert torch.equal(second.view().keys[:, :, 9], _slots(1, 9, seed=3).keys[:, :, 0])


def test_codecs():
    assert isinstance(get_codec("fp"), FpCodec)
    x = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    assert get_codec("fp").decode(get_codec("fp").parts(x)) is x and get_codec("fp").slot_bytes(4, torch.bfloat16) == 8
    with pytest.raises(ConfigError, match=r"codec 'int3'; accepted: fp"):
        get_codec("int3")


def _run(model, comp, ids, mask, steps):
    """Prefill, then ``steps`` greedy decode steps by hand; the buffer pointers of layer 0 per step."""
    arg = cache_argument(model)
    ptrs = []
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        cache = h.new_cache()
        out = model(ids, attention_mask=mask, use_cache=True, **{arg: cache})
        for _ in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = model(tok, attention_mask=mask, use_cache=True, **{arg: cache})
            ptrs.append(cache.layers[0].store.parts["keys.data"].data_ptr())
    return cache, ptrs


@pytest.mark.parametrize("name", ["tova_decode", "streaming_llm_decode", "h2o_decode", "weightedkv", "cam"])
def test_decode_time_cards_hold_one_buffer(name):
    """A capacity-bound cache keeps kept + `every` slots of capacity: evicting while decoding copies
    the kept slots back into the same buffers, no allocation per step."""
    model = tiny_model("llama")
    ids, mask = left_padded(2, 48, [0, 5], seed=4)
    cache, ptrs = _run(model, kvframe.build(name, budget=16), ids, mask, steps=12)
    assert len(set(ptrs)) == 1
    for layer in cache.layers:
        assert layer.store.capacity == int(layer.state.num_slots) + 1
        assert layer.store.allocations == 2  # the prompt, then the compressed cache
    mem = cache.memory()
    assert mem.reserved_bytes == sum(layer.store.reserved_bytes() for layer in cache.layers) > 0
    assert mem.bytes == sum(layer.store.nbytes() for layer in cache.layers)


def test_full_cache_decodes_in_place_and_memory_is_exact():
    model = tiny_model("llama")
    ids, mask = left_padded(1, 30, [0], seed=5)
    cache, ptrs = _run(model, kvframe.build("full"), ids, mask, steps=40)
    assert len(set(ptrs)) == 1  # one growth at the first step (30 -> 94 slots) holds all 40 tokens
    layer = cache.layers[0]
    assert layer.store.capacity == 30 + MIN_GROWTH and layer.store.n == 70
    cfg = model.config
    slot = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    mem = cache.memory()
    assert mem.kv_bytes == 70 * slot * cfg.num_hidden_layers
    meta = 8 + 4 + 1  # position, log-weight, validity per slot and head
    assert mem.reserved_bytes == (MIN_GROWTH - 40) * (slot + meta * cfg.num_key_value_heads) * cfg.num_hidden_layers


def test_after_prefill_compression_releases_memory():
    model = tiny_model("llama")
    ids, mask = left_padded(2, 64, [0, 0], seed=6)
    cache, _ = _run(model, kvframe.build("snapkv", budget=0.25), ids, mask, steps=0)
    for layer in cache.layers:
        assert layer.store.capacity == layer.store.n == 16 and layer.store.reserved_bytes() == 0
    cfg = model.config
    slot = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert cache.memory().kv_bytes == 2 * 16 * slot * cfg.num_hidden_layers


def test_compiled_decode_loop_compiles_no_new_frame_after_the_second_step():
    """With a capacity-bound cache every decoding step has the same shapes: torch.compile of the
    model's forward traces the first steps and then reuses its frames for all later ones, and the
    compiled loop generates the eager loop's tokens."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model("llama")
    comp = kvframe.build("streaming_llm_decode", budget=16)
    arg = cache_argument(model)
    ids = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(7))
    fwd = torch.compile(model.forward, backend="eager")
    tokens = {}
    for name, call in (("eager", model.forward), ("compiled", fwd)):
        frames = []
        with torch.no_grad(), kvframe.attach(model, comp) as h:
            cache = h.new_cache()
            tok = model(ids, use_cache=True, **{arg: cache}).logits[:, -1:].argmax(-1)
            out = [int(tok)]
            for _ in range(64):
                tok = call(input_ids=tok, use_cache=True, **{arg: cache}).logits[:, -1:].argmax(-1)
                out.append(int(tok))
                frames.append(counters["frames"]["total"])
        tokens[name] = out
    assert frames[1] > 0 and frames[-1] == frames[1]  # nothing compiled after the second step
    assert tokens["compiled"] == tokens["eager"]
    assert cache.layers[0].store.capacity == 17 and cache.layers[0].store.allocations == 2
