"""Budgets are exact: every layer keeps exactly B content slots per head, and the bytes shrink."""

from __future__ import annotations

import pytest
import torch

import kvframe
from kvframe.testing import tiny_model
from kvframe.policies.budgets import resolve_budget
from tests.cards.table import names
from tests.conftest import left_padded


def _prefill(model, comp, ids, mask=None):
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        cache = h.new_cache()
        model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
    return cache


@pytest.mark.parametrize("method", names(family="one_shot", exact=True, ragged=False))
@pytest.mark.parametrize("budget", [17, 0.25])
def test_exact_budget_tiny(method, budget):
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = left_padded(3, 96, [0, 9, 30])
    comp = kvframe.build(method, budget=budget, **({"scorer.window": 8} if method == "snapkv" else {}))
    cache = _prefill(model, comp, ids, mask)
    content = mask.sum(-1)  # real tokens per row
    expected = content.clamp(max=budget) if isinstance(budget, int) else torch.floor(content * budget + 0.5).long()
    for layer in cache.layers:
        kept = layer.state.content_slots()  # [B, H]
        assert torch.equal(kept, expected[:, None].expand_as(kept))
        # padding is never kept as content
        assert not bool((layer.state.valid & (layer.state.positions < 0)).any())
        assert layer.state.num_slots == int(expected.max())


def test_ragged_heads_adakv_exact_total_and_memory_reported():
    model = tiny_model("llama", num_hidden_layers=2, num_key_value_heads=2)
    ids, _ = left_padded(2, 80, [0, 0], seed=3)
    cache = _prefill(model, kvframe.build("adakv", budget=20, **{"scorer.window": 8}), ids)
    for layer in cache.layers:
        kept = layer.state.content_slots()
        assert torch.equal(kept.sum(-1), torch.tensor([40, 40]))  # H_kv x B jointly per row
        assert layer.state.num_slots == int(kept.max())
    mem = cache.memory()
    assert mem.content_slots == 2 * 2 * 40
    assert mem.padding_slots == mem.slots - mem.content_slots


def test_explicit_per_layer_per_head_budgets():
    model = tiny_model("llama", num_hidden_layers=2, num_key_value_heads=2)
    ids, _ = left_padded(1, 64, [0], seed=4)
    spec = {"scorer": "knorm", "schedule": {"name": "explicit", "layers": [[10, 30], 0.5]}}
    cache = _prefill(model, kvframe.build(spec), ids)
    assert cache.layers[0].state.content_slots().tolist() == [[10, 30]]
    assert cache.layers[1].state.content_slots().tolist() == [[32, 32]]
    assert cache.layers[0].state.num_slots == 30  # padded to the longest head, reported honestly


def test_pyramid_budgets_decrease_with_depth():
    model = tiny_model("llama", num_hidden_layers=4)
    ids, _ = left_padded(1, 128, [0], seed=5)
    cache = _prefill(model, kvframe.build("pyramidkv", budget=48, **{"scorer.window": 8}), ids)
    kept = [int(layer.state.content_slots()[0, 0]) for layer in cache.layers]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    assert abs(sum(kept) / len(kept) - 48) <= 1


def test_bytes_shrink_with_budget():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, _ = left_padded(2, 128, [0, 0], seed=6)
    full = _prefill(model, kvframe.build("full"), ids).memory()
    half = _prefill(model, kvframe.build("knorm", budget=0.5), ids).memory()
    quarter = _prefill(model, kvframe.build("knorm", budget=32), ids).memory()
    assert half.kv_bytes * 2 == full.kv_bytes
    assert quarter.kv_bytes * 4 == full.kv_bytes
    assert half.bytes * 2 == full.bytes


@pytest.mark.slow
def test_exact_budget_smollm2_2k(smollm2):
    model, tok = smollm2
    from kvframe.eval.tasks.passkey import make_passkey_samples

    sample = make_passkey_samples(tok, n=1, length=2048, seed=0)[0]
    ids = tok(sample.context, return_tensors="pt").input_ids[:, :2000]
    full = _prefill(model, kvframe.build("full"), ids)
    for budget in (512, 0.25):
        cache = _prefill(model, kvframe.build("snapkv", budget=budget), ids)
        b = budget if isinstance(budget, int) else 500
        for layer in cache.layers:
            assert layer.state.keys.shape[2] == b and layer.state.values.shape[2] == b
            assert bool(layer.state.valid.all())
        assert cache.memory().kv_bytes * 2000 == full.memory().kv_bytes * b


def test_resolve_budget_rounding():
    content = torch.tensor([[10, 10], [3, 3], [1, 1]])
    assert resolve_budget(0.25, content).tolist() == [[3, 3], [1, 1], [1, 1]]
    assert resolve_budget(5, content).tolist() == [[5, 5], [3, 3], [1, 1]]


# ----------------------------------------------------------------------------- messages and padding
@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (1.5, r"budget=1.5 is > 1 as a ratio and not a whole number: it is neither a ratio in \(0, 1\] nor a whole number of tokens; accepted: a ratio in \(0, 1\] \(e.g. 0.25\) or an integer number of tokens >= 1 \(e.g. 512\)$"),
        (100.25, r"budget=100.25 is > 1 as a ratio and not a whole number: it is neither"),
        (512.0, r"budget=512.0 is > 1 as a ratio; accepted: a ratio in \(0, 1\], or an integer number of tokens \(write 512 without a decimal point to keep 512 tokens\)$"),
        (2.0, r"write 2 without a decimal point to keep 2 tokens"),
    ],
)
def test_budget_above_one_hint(budget, message):
    with pytest.raises(kvframe.ConfigError, match=message):
        kvframe.build("knorm", budget=budget)
    if not float(budget).is_integer():
        with pytest.raises(kvframe.ConfigError) as info:
            kvframe.build("knorm", budget=budget)
        assert "without a decimal point" not in str(info.value)


def test_all_padding_prompt_with_an_absolute_budget_is_named():
    keys = torch.randn(2, 2, 6, 4)
    valid = torch.zeros(2, 6, dtype=torch.bool)
    message = r"budget=4 tokens: the prompt has no content tokens \(every token is padding\), so there is nothing to keep"
    with pytest.raises(kvframe.ConfigError, match=message):
        kvframe.compress(kvframe.build("knorm", budget=4), keys, keys, valid=valid)
    with pytest.raises(kvframe.ConfigError, match=message):
        resolve_budget(4, torch.zeros(2, 2, dtype=torch.long))
    model = tiny_model("llama")
    ids = torch.zeros(2, 10, dtype=torch.long)
    with pytest.raises(kvframe.ConfigError, match=message), torch.no_grad(), kvframe.attach(model, kvframe.build("knorm", budget=4)):
        model(ids, attention_mask=torch.zeros_like(ids))
    # a ratio keeps nothing of nothing
    assert kvframe.compress(kvframe.build("knorm", budget=0.5), keys, keys, valid=valid).kept_per_head.tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize(
    "spec", [{"name": "knorm", "budget": 8}, {"name": "snapkv", "budget": 0.25, "scorer.window": 8}, {"name": "adakv", "budget": 8, "scorer.window": 8}]
)
def test_one_all_padding_row_keeps_nothing_and_leaves_the_others_alone(spec):
    """Left padding where one row is nothing but padding: that row keeps no prompt slot, and the other
    rows keep and generate exactly what they do when that row holds a real prompt instead."""
    spec = dict(spec)
    comp = kvframe.build(spec.pop("name"), **spec)
    model = tiny_model("llama")
    ids, mask = left_padded(3, 40, [0, 40, 7], seed=3)
    ref_ids, ref_mask = ids.clone(), mask.clone()
    ref_ids[1], ref_mask[1] = torch.arange(3, 43), 1
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    caches, outs = [], []
    for i, m in ((ids, mask), (ref_ids, ref_mask)):
        with torch.no_grad(), kvframe.attach(model, comp) as h:
            cache = h.new_cache()
            positions = (m.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them from the mask
            model(i, attention_mask=m, position_ids=positions, past_key_values=cache, logits_to_keep=1)
            outs.append(model.generate(i, attention_mask=m, **gen))
        caches.append(cache)
    for layer in caches[0].layers:
        assert layer.state.valid[1].sum().item() == 0
    for r in (0, 2):
        assert torch.equal(outs[0][r], outs[1][r])
        for layer, ref_layer in zip(caches[0].layers, caches[1].layers):
            kept = layer.state.positions[r][layer.state.valid[r]]
            assert len(kept) > 0 and torch.equal(kept, ref_layer.state.positions[r][ref_layer.state.valid[r]])
