"""kvframe.cache: SlotCache.fork, the copy-on-write copy every compress-once-answer-many path relies on."""

from __future__ import annotations

import pytest
import torch

import kvframe
from kvframe.attach import cache_argument
from kvframe.errors import KVFrameError
from kvframe.testing import tiny_model
from tests.conftest import left_padded


def _prefill(model, comp, ids, mask):
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        cache = h.new_cache()
        model(ids, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
    return cache


def _tensors(cache):
    out = []
    for layer in cache.layers:  # the store's own buffers (a packed store's view is a gather made per pass)
        out += [*layer.store.parts.values(), *layer.store.stats.values()]
        out += [t for t in (layer.shift, layer.valid_seen, layer.next_position) if t is not None]
    return out


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t


def test_fork_shares_tensors_and_copies_bookkeeping():
    model = tiny_model("llama")
    ids, mask = left_padded(2, 40, [0, 6])
    cache = _prefill(model, kvframe.build("h2o_decode", budget=0.5), ids, mask)  # keeps statistics attn and age
    fork = cache.fork()
    assert fork is not cache and fork.compressor is cache.compressor and fork.rope is cache.rope
    assert [a.data_ptr() for a in _tensors(fork)] == [a.data_ptr() for a in _tensors(cache)]
    for a, b in zip(fork.layers, cache.layers):
        assert a is not b and a.state is not b.state and a.state.stats is not b.state.stats
        assert set(a.state.stats) == {"attn", "age"}
        assert (a.seen, a.decode_steps, a.compressions) == (b.seen, b.decode_steps, b.compressions)
    assert fork.get_seq_length() == cache.get_seq_length() == 40
    assert fork.memory() == cache.memory()


@pytest.mark.parametrize("name", ["h2o_decode", "streaming_llm_decode", "weightedkv"])
def test_decoding_on_a_fork_leaves_the_original_bit_identical(name):
    """Decode-time compression, statistics updates and re-indexed positions all run on the fork."""
    model = tiny_model("llama")
    ids, mask = left_padded(2, 40, [0, 6], seed=2)
    comp = kvframe.build(name, budget=0.5)
    cache = _prefill(model, comp, ids, mask)
    before = [t.clone() for t in _tensors(cache)]
    seen = [layer.seen for layer in cache.layers]
    fork = cache.fork()
    fork.batch_repeat_interleave(2)  # rows reordered on the fork only
    nxt = torch.full((4, 1), 7)
    full_ids = torch.cat([ids.repeat_interleave(2, 0), nxt], 1)
    full_mask = torch.cat([mask.repeat_interleave(2, 0), torch.ones_like(nxt)], 1)
    with torch.no_grad(), kvframe.attach(model, comp):
        model.generate(full_ids, attention_mask=full_mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       **{cache_argument(model): fork})
    assert fork.layers[0].seen == 46 and fork.layers[0].compressions > cache.layers[0].compressions
    after = _tensors(cache)
    # bit for bit: the buffers' free capacity is uninitialised memory (possibly NaN patterns)
    assert len(after) == len(before) and all(torch.equal(_bits(a), _bits(b)) for a, b in zip(after, before))
    assert [layer.seen for layer in cache.layers] == seen


def test_fork_continues_the_generator_of_stochastic_policies():
    model = tiny_model("llama")
    ids, mask = left_padded(1, 40, [0], seed=3)
    comp = kvframe.build("random", budget=0.5)
    cache = _prefill(model, comp, ids, mask)
    gen = cache.generator(torch.device("cpu"))
    fork = cache.fork()
    fgen = fork.generator(torch.device("cpu"))
    assert fgen is not gen
    assert torch.equal(torch.rand(4, generator=fgen), torch.rand(4, generator=gen))  # the same next draws


def test_a_layer_in_the_middle_of_a_pass_cannot_be_forked():
    model = tiny_model("llama")
    cache = kvframe.SlotCache.for_model(model, kvframe.build("full"))
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(KVFrameError, match="middle of a forward pass \\(3 appended tokens not yet attended\\)"):
        cache.fork()
