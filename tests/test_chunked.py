"""Chunked prefill (per_chunk trigger): identity when nothing is dropped, scoring-pass statistics,
gradients that match a direct autograd computation, exact budgets per chunk."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

import kvframe
from kvframe.errors import ConfigError
from kvframe.testing import tiny_model
from kvframe.policies.base import CompressionContext, KeyMerge, MergedKeys, Selection
from kvframe.registry import register
from kvframe.slots import SlotState
from tests.conftest import ARCHS, left_padded


@register("key_merge", "_test_reads_grad")
@dataclass
class _ReadsGrad(KeyMerge):
    """Test-only key merge that reads the backward scoring pass's gradients."""

    stats = ("grad", "window_attn")

    def merge(self, state: SlotState, selection: Selection, kept: SlotState, ctx: CompressionContext) -> MergedKeys:
        return MergedKeys(kept.keys)


def _chunked(size, scoring, budget=1.0, key_merge="drop"):
    return kvframe.build(
        {
            "scorer": "knorm",
            "budget": budget,
            "key_merge": key_merge,
            "trigger": {"name": "per_chunk", "size": size, "scoring_pass": scoring},
        }
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scoring", ["none", "forward", "backward"])
def test_chunked_prefill_without_dropping_equals_vanilla(arch, scoring):
    model = tiny_model(arch)
    ids, mask = left_padded(2, 45, [0, 6])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    comp = _chunked(16, scoring, key_merge="_test_reads_grad" if scoring == "backward" else "drop")
    with kvframe.attach(model, comp) as handle:
        with torch.no_grad():
            out = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == ref.shape
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-5
    assert torch.equal(gen, ref_gen)
    assert handle.cache is not None
    # parameters never receive gradients from the scoring pass
    assert all(p.grad is None for p in model.parameters())


def test_backward_scoring_gradient_matches_autograd():
    """The 'grad' statistic is d(chunk loss)/d(pre-RoPE key) of every past slot."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (1, 48))
    comp = _chunked(16, "backward", key_merge="_test_reads_grad")
    from kvframe import chunked

    seen = []
    orig = chunked._compress_past

    def spy(cache):
        seen.append([layer.state.stats["grad"].clone() for layer in cache.layers])
        orig(cache)

    chunked._compress_past = spy
    try:
        with kvframe.attach(model, comp) as handle:
            with torch.no_grad():
                model(ids)
    finally:
        chunked._compress_past = orig
    # the statistic is dropped once the past is compressed (no key-sized tensor kept while decoding)
    assert all("grad" not in layer.state.stats for layer in handle.cache.layers)
    # the last scoring pass was chunk [32, 48) on a past of 32 tokens
    got = seen[-1]

    past = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :32], past_key_values=past, use_cache=True)
    leaves = []
    for layer in past.layers:
        layer.keys = layer.keys.detach().requires_grad_(True)
        leaves.append(layer.keys)
    out = model(ids[:, 32:48], past_key_values=past, use_cache=True)
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 33:48])
    grads = torch.autograd.grad(loss, leaves)
    rope = kvframe.rope.Rotary.from_model(model)
    pos = torch.arange(32).expand(1, grads[0].shape[1], 32)
    for i, (g, mine) in enumerate(zip(grads, got)):
        expected = rope.unrotate(g, pos, i)
        assert torch.allclose(mine, expected, atol=1e-6, rtol=1e-4), f"layer {i}"
        assert expected.abs().max() > 0


def test_window_attention_statistic_sums_to_query_mass():
    """Per KV head, the scoring pass's attention over past slots plus the chunk's own slots sums to
    G x (chunk queries); the past part is what window_attn keeps."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40))
    comp = kvframe.build(
        {"scorer": "window_attention", "budget": 1.0, "trigger": {"name": "per_chunk", "size": 20, "scoring_pass": "forward"}}
    )
    with kvframe.attach(model, comp) as handle, torch.no_grad():
        model(ids)
    st = handle.cache.layers[0].state
    wa = st.stats["window_attn"][:, :, :20]
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    total = wa.sum(-1)
    assert bool((total > 0).all()) and bool((total < g * 20).all())


@pytest.mark.parametrize("budget", [24, 0.5])
def test_chunk_compression_keeps_exact_budget(budget):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (1, 80))
    comp = _chunked(16, "forward", budget=budget)
    sizes = []

    from kvframe import chunked

    orig = chunked._compress_past

    def spy(cache):
        orig(cache)
        sizes.append([int(layer.state.content_slots().max()) for layer in cache.layers])

    chunked._compress_past = spy
    try:
        with kvframe.attach(model, comp) as handle, torch.no_grad():
            model(ids)
    finally:
        chunked._compress_past = orig
    seen = [16 * k for k in range(1, 5)]  # past before chunks 2..5
    for past, after in zip(seen, sizes):
        want = min(past, budget) if isinstance(budget, int) else int(past * budget + 0.5)
        assert after == [want] * len(after)
    # no compression after the last chunk
    assert handle.cache.memory().per_layer_slots[0] == sizes[-1][0] + 16


def test_backward_scoring_refuses_inference_mode():
    model = tiny_model("llama")
    comp = _chunked(8, "backward", key_merge="_test_reads_grad")
    with kvframe.attach(model, comp), torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        model(torch.randint(3, 128, (1, 20)))


def test_gradient_statistic_needs_backward_trigger():
    with pytest.raises(ConfigError, match="scoring_pass: backward"):
        _chunked(8, "forward", key_merge="_test_reads_grad")


@pytest.mark.parametrize(
    "method, overrides, conserved",
    [
        ("asymkv", {"value_merge.clamp": None}, False),
        ("kvslimmer", {"value_merge.clamp": None}, False),
        ("asymkv_disjoint", {"value_merge.clamp": None}, True),
    ],
)
def test_pair_merging_methods_end_every_chunk_at_the_budget(method, overrides, conserved):
    """AsymKV/KVSlimmer: after each chunk's compression the past holds exactly budget slots; the
    counts sum to the tokens seen (disjoint pairs, no clamp), or at most that (overlapping picks
    evict a slot, docs/methods.md#overlapping-picks)."""
    from kvframe import chunked

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 80))
    comp = kvframe.build(method, budget=0.75, **{"selector.n_sink": 2, "trigger.size": 16, **overrides})
    record = []
    orig = chunked._compress_past

    def spy(cache):
        orig(cache)
        for layer in cache.layers:
            st = layer.state
            record.append((int(layer.valid_seen[0]), int(st.content_slots().max()), st.log_weights.exp().sum(-1)[0]))

    chunked._compress_past = spy
    try:
        with kvframe.attach(model, comp), torch.no_grad():
            model(ids)
    finally:
        chunked._compress_past = orig
    assert len(record) == 4 * len(model.model.layers)
    for seen, slots, counts in record:
        assert slots == int(seen * 0.75 + 0.5)
        if conserved:
            assert torch.allclose(counts, torch.full_like(counts, float(seen)))
        else:
            assert bool((counts <= seen + 1e-4).all()) and bool((counts >= slots - 1e-4).all())


def test_multi_token_input_on_a_chunked_cache_compresses_the_past_first():
    """An appended question (fewer tokens than a chunk) on a non-empty cache gets the scoring pass,
    the past is compressed to the budget, then the question is appended (as every later window)."""
    model = tiny_model("llama")
    comp = kvframe.build("kvslimmer", budget=20, **{"selector.n_sink": 2, "trigger.size": 16})
    with kvframe.attach(model, comp) as handle, torch.no_grad():
        cache = handle.new_cache()
        model(torch.randint(3, 128, (1, 40)), past_key_values=cache, use_cache=True)  # chunks 16+16+8
        before = int(cache.layers[0].state.content_slots().max())
        model(torch.randint(3, 128, (1, 5)), past_key_values=cache, use_cache=True)
        after = int(cache.layers[0].state.content_slots().max())
        model(torch.randint(3, 128, (1, 1)), past_key_values=cache, use_cache=True)  # decoding: never compressed
        decoded = int(cache.layers[0].state.content_slots().max())
    assert before == 20 + 8 and after == 20 + 5 and decoded == after + 1
