"""torch.compile of compressors (compiled == eager for every card is in tests/cards/test_cards.py): shapes are
dynamic (growing prompts do not recompile), the eager switch, config errors, and a compiled model
forward (the decode step inside attach) that equals eager without recompiling per step.

Most tests compile with the ``aot_eager`` backend (Dynamo capture and AOTAutograd tracing, the part
that decides graph breaks and recompiles) to keep CI fast; ``test_inductor_matches_eager`` runs the
real inductor code generation (slow: ~30 s of C++ compilation on 2 cores).
"""

from __future__ import annotations


import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import kvframe
from kvframe.compressor import check_compile
from kvframe.errors import ConfigError
from kvframe.testing import tiny_model
from kvframe.api import compression_inputs
from tests.cards.table import BY_NAME
from kvframe.slots import SlotState

TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(t: int, seed: int = 0, q: int = 16) -> dict:
    """Keyword arguments of ``kvframe.compress`` (and ``compression_inputs``): T random slots, the
    last ``q`` queries, and every framework statistic a card may read."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        keys=torch.randn(1, 3, t, 32, generator=g),
        values=torch.randn(1, 3, t, 32, generator=g),
        queries=torch.randn(1, 6, q, 32, generator=g),
        stats=dict(
            attn=torch.rand(1, 3, t, generator=g),
            age=torch.randint(1, 9, (1, 3, t), generator=g).float(),
            window_attn=torch.rand(1, 3, t, generator=g),
            grad=torch.randn(1, 3, t, 32, generator=g),
        ),
    )


def _run(comp, kw):
    """One trigger firing (a second one: step 1) on fresh state and context built from ``kw``."""
    return comp.compress_step(*compression_inputs(comp, step=1, **kw))


def _assert_same(a: SlotState, b: SlotState) -> None:
    assert torch.equal(a.valid, b.valid)
    assert torch.equal(a.positions, b.positions)  # identical kept slots
    torch.testing.assert_close(a.keys, b.keys, **TOL)
    torch.testing.assert_close(a.values, b.values, **TOL)
    torch.testing.assert_close(a.log_weights, b.log_weights, **TOL)
    assert set(a.stats) == set(b.stats)
    for k in a.stats:
        torch.testing.assert_close(a.stats[k], b.stats[k], **TOL)


@pytest.mark.parametrize("name", ["snapkv", "kvslimmer", "weightedkv", "adakv"])
def test_growing_lengths_do_not_recompile(name):
    """Dynamic shapes: after the first two lengths (the second may generalise a specialised size),
    four more lengths add no compiled frame."""
    counter = CompileCounterWithBackend("aot_eager")
    comp = kvframe.build(name, budget=BY_NAME[name].parity_budget)
    comp.compile = check_compile({"backend": counter})  # a backend callable is set from Python, not YAML
    lengths = (64, 90, 131, 200, 257, 333)
    frames = []
    for t in lengths:
        _run(comp, _inputs(t, seed=t))
        frames.append(counter.frame_count)
    assert frames[0] > 0
    assert frames[-1] == frames[1], f"recompiled while lengths grew: frames after each length {frames}"
    assert frames[-1] <= 40, frames  # a handful of graph segments, not one per length


def test_eager_switch_and_auto():
    comp = kvframe.build("snapkv", compile=False)
    assert not comp.compiles_on(torch.device("cpu")) and not comp.compiles_on(torch.device("cuda"))
    auto = kvframe.build("snapkv")
    assert auto.compile == "auto"
    assert not auto.compiles_on(torch.device("cpu")) and auto.compiles_on(torch.device("cuda"))
    assert kvframe.build("snapkv", compile=True).compiles_on(torch.device("cpu"))
    # eager runs never touch torch.compile
    _run(comp, _inputs(50))
    assert not comp._compiled
    assert kvframe.build("snapkv", compile={"backend": "aot_eager", "mode": None}).to_dict()["compile"] == {
        "backend": "aot_eager",
        "mode": None,
    }


def test_compile_from_yaml(tmp_path):
    card = tmp_path / "m.yaml"
    card.write_text("base: snapkv\ncompile: false\n")
    assert kvframe.build(str(card)).compile is False
    card.write_text("base: snapkv\ncompile: {backend: aot_eager}\n")
    assert kvframe.build(str(card)).compile == {"backend": "aot_eager"}


@pytest.mark.parametrize(
    "value, message",
    [
        ("sometimes", "accepted: auto"),
        ({"backend": "no_such_backend"}, "inductor"),
        ({"backnd": "inductor"}, "accepted: backend, mode, dynamic"),
        ({"dynamic": "yes"}, "dynamic"),
        (3, "accepted: auto"),
    ],
)
def test_bad_compile_settings(value, message):
    with pytest.raises(ConfigError, match=message):
        kvframe.build("snapkv", compile=value)


def test_compressor_pickles_without_compiled_code():
    import pickle

    comp = kvframe.build("knorm", compile={"backend": "aot_eager"})
    _run(comp, _inputs(40))
    assert comp._compiled
    clone = pickle.loads(pickle.dumps(comp))
    assert not clone._compiled and clone.compile == {"backend": "aot_eager"}


@pytest.mark.parametrize("name", ["snapkv", "weightedkv", "kvslimmer"])
def test_compiled_compressor_inside_attach_generates_the_same(name):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    outs = []
    for setting in (False, {"backend": "aot_eager"}):
        comp = kvframe.build(name, budget=24, compile=setting)
        with torch.no_grad() if name != "kvslimmer" else torch.enable_grad(), kvframe.attach(model, comp):
            outs.append(model.generate(ids, max_new_tokens=10, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_compiled_model_decode_step_inside_attach():
    """``torch.compile(model.forward)`` with a compressing cache: same tokens as eager, and a second,
    longer generation from a different prompt length compiles nothing new (no per-step recompiles)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    comp = kvframe.build("weightedkv", budget=16, compile=False)
    with torch.no_grad(), kvframe.attach(model, comp):
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    counter = CompileCounterWithBackend("aot_eager")
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend=counter, dynamic=True)
    try:
        with torch.no_grad(), kvframe.attach(model, comp):
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(out, ref)
        frames = counter.frame_count
        ids2 = torch.randint(0, 128, (1, 57), generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), kvframe.attach(model, comp):
            model.generate(ids2, max_new_tokens=20, do_sample=False)
        assert counter.frame_count == frames, f"{counter.frame_count - frames} frames recompiled for a new length"
    finally:
        model.forward = eager_forward


@pytest.mark.slow
def test_inductor_matches_eager(tmp_path, monkeypatch):
    """The real inductor backend (C++ code generation on CPU) on SnapKV: same kept slots, values
    within 1e-5, at two lengths with one compile."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = kvframe.build("snapkv", compile=False)
    compiled = kvframe.build("snapkv", compile=True)
    for t in (120, 211):
        kw = _inputs(t, seed=t)
        _assert_same(_run(eager, kw)[0], _run(compiled, kw)[0])


# ----------------------------------------------------------------------------- scorer requirement
def test_a_selector_that_uses_scores_needs_a_scorer():
    with pytest.raises(ConfigError, match=r"has no scorer, and selector 'topk' keeps slots by score; give one"):
        kvframe.build({"selector": "topk", "budget": 0.5})
    with pytest.raises(ConfigError, match=r"compressor snapkv has no scorer, and selector 'adaptive_heads'"):
        kvframe.build("snapkv", scorer=None, selector="adaptive_heads")


def test_no_scorer_is_fine_when_nothing_fires_or_the_selector_needs_no_scores():
    assert kvframe.build("full").scorer is None  # trigger never: budgets and scores are irrelevant
    comp = kvframe.build({"selector": "uniform_halving", "value_merge": "reweight", "budget": 0.25})
    assert comp.scorer is None
    res = kvframe.compress(comp, torch.randn(1, 2, 200, 8), torch.randn(1, 2, 200, 8))
    assert res.kept_per_head.tolist() == [[32 + 32 + 34] * 2]  # sinks + window + a quarter of the middle
