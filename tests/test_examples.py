"""configs/examples/: compositions no paper has, built only from registered policies, run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvframe
from kvframe.testing import tiny_model
from tests.conftest import left_padded

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "configs" / "examples").glob("*.yaml"))


def test_there_are_at_least_two_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_example_generates_within_budget(path, arch):
    model = tiny_model(arch)
    ids, mask = left_padded(2, 48, [0, 7])
    comp = kvframe.build(str(path), budget=0.5)
    if comp.scorer is not None and getattr(comp.scorer, "window", None):
        comp = kvframe.build(str(path), budget=0.5, **{"scorer.window": 8})
    with kvframe.attach(model, comp) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 54)
    prompt = mask.sum(-1)
    cap = torch.floor(prompt * 0.5 + 0.5).long()
    mem = handle.cache.memory()
    for layer in handle.cache.layers:
        content = layer.state.content_slots()  # [B, H]
        if comp.trigger.name == "decode":
            assert torch.equal(content, cap[:, None].expand_as(content))
        else:  # after-prefill: the budget (per head, or jointly per layer when head-adaptive) + 5 decoded tokens
            assert torch.equal(content.sum(-1), (cap + 5) * content.shape[1])
    assert mem.content_slots == int(sum((cap + (0 if comp.trigger.name == "decode" else 5)).sum() * layer.state.num_heads for layer in handle.cache.layers))
    # merged values are finite and the log-weights are ln(count) >= 0 for sum merges
    for layer in handle.cache.layers:
        assert bool(torch.isfinite(layer.state.values).all())
        assert bool((layer.state.log_weights[layer.state.valid] >= 0).all())
