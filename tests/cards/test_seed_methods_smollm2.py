"""Every seed method end to end on the real SmolLM2: generate() on a ~2k-token prompt at two
budgets, and inside ``kvframe eval``. Marked slow (real model); they run in CI."""

from __future__ import annotations

import json

import pytest
import torch

import kvframe
from kvframe.cli import main
from kvframe.eval.tasks.passkey import make_passkey_samples
from tests.cards.table import names

SEED_METHODS = names(seed_method=True)


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tok = smollm2
    sample = make_passkey_samples(tok, n=1, length=2048, depths=[0.3], seed=1)[0]
    ids = tok(sample.context + "\n" + sample.question, return_tensors="pt").input_ids
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("method", SEED_METHODS)
def test_generate_on_smollm2_2k_at_two_budgets(smollm2, prompt, method):
    model, tok = smollm2
    n = prompt.shape[1]
    assert 1900 <= n <= 2200
    for budget in (0.5, 0.25):
        comp = kvframe.build(method, budget=budget)
        with torch.no_grad(), kvframe.attach(model, comp) as handle:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        assert out.shape == (1, n + 4)
        cache = handle.cache
        mem = cache.memory()
        slots = [int(layer.state.content_slots().max()) for layer in cache.layers]
        assert all(s < n for s in slots), (method, budget, slots)  # really compressed
        for layer in cache.layers:
            st = layer.state
            assert bool(torch.isfinite(st.keys[st.valid]).all()) and bool(torch.isfinite(st.values[st.valid]).all())
        if comp.trigger.name == "decode":  # fixed capacity: budget x prompt length
            assert set(slots) == {int(n * budget + 0.5)}
        assert mem.kv_bytes < 2 * n * 30 * 3 * 64 * 4 * 0.8


@pytest.mark.slow
def test_seed_methods_inside_kvframe_eval(tmp_path):
    methods = "[" + ",".join(SEED_METHODS) + "]"
    args = ["eval", f"output_dir={tmp_path}", "run_name=seed", f"methods={methods}", "budgets=[0.5]",
            "tasks=[{name: passkey, n_samples: 1, length: 768}]", "max_new_tokens=8", "mode=query_agnostic"]
    assert main(args) == 0
    records = json.loads((tmp_path / "seed" / "results.json").read_text())
    assert sorted(r["method"] for r in records) == sorted(SEED_METHODS)
    for r in records:
        assert r["samples"] == 1 and r["metric"] == "accuracy" and 0.0 <= r["value"] <= 1.0
        assert r["compressor"]["budget"] == 0.5
