"""Every built-in card, driven by the table in ``tests/cards/table.py``: it loads from YAML by name
and by path, compiled equals eager, and it compresses and generates inside ``attach`` on a tiny
model with left padding, holding the budget its trigger promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvframe
from kvframe import registry
from kvframe.policies.budgets import resolve_budget
from kvframe.testing import tiny_model
from tests.cards.table import CARDS, CardCase
from tests.conftest import left_padded
from tests.test_compressor import _assert_same, _inputs, _run

REGISTRY = Path(__file__).resolve().parents[2] / "registry"
IDS = [c.name for c in CARDS]
ROWS, LENGTH, PADS, NEW = 2, 96, [0, 16], 6


def test_table_covers_every_card():
    builtin = {n for n, _, origin in registry.list_methods() if origin == "built-in"}
    assert builtin == {p.stem for p in REGISTRY.glob("*.yaml")}
    assert sorted(IDS) == sorted(builtin), "every card in registry/ needs exactly one row in tests/cards/table.py"


@pytest.mark.parametrize("case", CARDS, ids=IDS)
def test_card_builds_by_name_and_path_and_names_its_paper(case: CardCase):
    by_name = kvframe.build(case.name)
    assert by_name.to_dict() == kvframe.build(str(REGISTRY / f"{case.name}.yaml")).to_dict()
    assert by_name.name == case.name and by_name.spec.get("paper"), f"card {case.name} must name its paper"
    # what `kvframe show` prints builds the same compressor again
    assert kvframe.build(by_name.to_dict()).to_dict() == by_name.to_dict()
    assert by_name.compresses == (case.family != "never")


@pytest.mark.parametrize("case", [c for c in CARDS if c.family != "never"], ids=[c.name for c in CARDS if c.family != "never"])
def test_compiled_equals_eager(case: CardCase):
    eager = kvframe.build(case.name, budget=case.parity_budget, compile=False)
    compiled = kvframe.build(case.name, budget=case.parity_budget, compile={"backend": "aot_eager"})
    for t in (61, 100, 137):  # odd and growing lengths
        kw = _inputs(t, seed=t)
        a, fired_a = _run(eager, kw)
        b, fired_b = _run(compiled, kw)
        assert fired_a == fired_b
        _assert_same(a, b)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=512)


def _generate(model, comp, ids, mask):
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    return out, h.cache


def _prefill(model, comp, ids, mask):
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        cache = h.new_cache()
        model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
    return cache


@pytest.mark.parametrize("case", CARDS, ids=IDS)
def test_attach_generate_tiny_left_padded(model, case: CardCase):
    ids, mask = left_padded(ROWS, LENGTH, PADS, seed=7)
    comp = kvframe.build(case.name, budget=case.tiny_budget, **case.tiny)
    content = mask.sum(-1)  # [B] prompt tokens per row
    h = model.config.num_key_value_heads
    want = resolve_budget(case.tiny_budget, content[:, None].expand(ROWS, h))  # [B, H] slots a budget keeps

    cache = _prefill(model, comp, ids, mask)
    for layer in cache.layers:
        st = layer.state
        kept = st.content_slots()
        assert not bool((st.valid & (st.positions < 0)).any())  # padding never kept as content
        if case.family == "never":
            assert torch.equal(kept, content[:, None].expand_as(kept))
        elif case.family == "chunked":
            assert bool((kept <= case.tiny_budget + comp.trigger.chunk_size).all())
        elif case.ragged:
            assert torch.equal(kept.sum(-1), want.sum(-1)) and bool((kept >= 1).all())
        elif case.exact:
            assert torch.equal(kept, want)
        else:
            assert bool((kept < content[:, None]).all())

    out, gen_cache = _generate(model, comp, ids, mask)
    assert out.sequences.shape == (ROWS, LENGTH + NEW)
    scores = torch.stack(out.scores, dim=1)
    assert torch.isfinite(scores).all()
    if case.family == "decode":  # the cache holds its capacity at every step
        for layer in gen_cache.layers:
            assert torch.equal(layer.state.content_slots(), want)
    if case.row_independent:  # the padded row generates as it does alone
        alone, _ = _generate(model, comp, ids[1:, PADS[1]:], mask[1:, PADS[1]:])
        torch.testing.assert_close(torch.stack(alone.scores, dim=1)[0], scores[1], atol=2e-4, rtol=1e-4)
        assert torch.equal(alone.sequences[0, -NEW:], out.sequences[1, -NEW:])
