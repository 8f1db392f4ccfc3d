"""kvframe.compress_context: compress a context once, answer many questions on forks of its cache."""

from __future__ import annotations

import pytest
import torch

import kvframe
from kvframe.attach import cache_argument
from kvframe.errors import ConfigError, KVFrameError
from kvframe.testing import tiny_model
from tests.cards.table import BY_NAME
from tests.conftest import left_padded

CTX = 80
N_NEW = 8
ATOL = 1e-5
# one card per trigger family: never, after_prefill (uniform and ragged heads), decode-time (one with
# re-indexed positions, one that draws random numbers while decoding), chunked with a scoring pass
CARDS = ["full", "snapkv", "knorm", "adakv", "tova_decode", "streaming_llm_decode", "cam", "kvslimmer"]


def _comp(name: str, **over):
    case = BY_NAME[name]
    return kvframe.build(name, budget=case.tiny_budget, **{**case.tiny, **over})


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(3, 128, (1, CTX), generator=g)
    questions = [torch.randint(3, 128, (n,), generator=g) for n in (5, 9, 5, 1)]
    return ctx, questions


def _separate(model, comp, ctx, q, n=N_NEW, **kw):
    """The reference: compress this context for this question alone (prefill, append, decode)."""
    full = torch.cat([ctx, q[None]], 1)
    arg = cache_argument(model)
    with torch.no_grad(), kvframe.attach(model, comp) as h:
        cache = h.new_cache()
        model(ctx, use_cache=True, logits_to_keep=1, **{arg: cache})
        out = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **{arg: cache}, **kw)
    return out.sequences[0, full.shape[1]:], torch.stack(out.scores, 1)[0]


def _on_fork(model, comp, ctx_obj, qs, n=N_NEW):
    """Questions ``qs`` as one left-padded batch on a fork of the context (what ctx.generate runs), with scores."""
    width = max(len(q) for q in qs)
    q_ids = torch.zeros(len(qs), width, dtype=torch.long)
    q_mask = torch.zeros_like(q_ids)
    for r, q in enumerate(qs):
        q_ids[r, width - len(q):] = q
        q_mask[r, width - len(q):] = 1
    ids = torch.cat([ctx_obj.input_ids.expand(len(qs), -1), q_ids], 1)
    mask = torch.cat([ctx_obj.attention_mask.expand(len(qs), -1), q_mask], 1)
    with torch.no_grad(), kvframe.attach(model, comp):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None,
                             **{cache_argument(model): ctx_obj.fork(rows=[0] * len(qs))})
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def _close(a, b):
    finite = torch.isfinite(a) & torch.isfinite(b)
    return torch.equal(torch.isfinite(a), torch.isfinite(b)) and float((a - b)[finite].abs().max()) <= ATOL


def _snapshot(cache):
    out = []
    for layer in cache.layers:
        st = layer.state
        tensors = [st.keys, st.values, st.positions, st.log_weights, st.valid, *st.stats.values()]
        extra = [t for t in (layer.shift, layer.valid_seen, layer.prompt_valid, layer.next_position) if t is not None]
        counters = (layer.seen, layer.decode_steps, layer.compressions)
        out.append(([t.clone() for t in tensors + extra], sorted(st.stats), *counters))
    return out


def _same(a, b):
    def layer_same(x, y):
        return len(x[0]) == len(y[0]) and all(torch.equal(s, t) for s, t in zip(x[0], y[0])) and x[1:] == y[1:]

    return len(a) == len(b) and all(layer_same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", CARDS)
def test_answers_equal_compressing_the_context_for_each_question(model, data, name):
    ctx_ids, qs = data
    comp = _comp(name)
    ctx = kvframe.compress_context(model, comp, ctx_ids)
    before = _snapshot(ctx.cache)
    refs = [_separate(model, comp, ctx_ids, q, eos_token_id=None) for q in qs]
    answers = ctx.generate(qs, max_new_tokens=N_NEW, eos_token_id=None)
    one_by_one = ctx.generate(qs, max_new_tokens=N_NEW, eos_token_id=None, batch_size=1)
    for q, (ref_ids, ref_scores), got, single in zip(qs, refs, answers, one_by_one):
        assert torch.equal(got, ref_ids) and torch.equal(single, ref_ids), (name, len(q))
        ids, scores = _on_fork(model, comp, ctx, [q])
        assert torch.equal(ids[0], ref_ids)
        assert torch.equal(scores[0], ref_scores)  # a fork continues from the very same tensors: bit-identical
    # the context is untouched by every answer, fork and compression that ran on its forks
    assert _same(_snapshot(ctx.cache), before)
    ctx.check_intact()


@pytest.mark.parametrize("name", ["snapkv", "adakv", "kvslimmer", "full"])
def test_padded_batch_logits_equal_each_question_alone(model, data, name):
    """Questions of different lengths in one left-padded batch (padding between context and question)."""
    ctx_ids, qs = data
    comp = _comp(name)
    ctx = kvframe.compress_context(model, comp, ctx_ids)
    batch = qs[:3]  # lengths 5, 9, 5
    assert ctx._padding_is_inert([len(q) for q in batch], N_NEW)
    assert ctx._batches([len(q) for q in batch], None, N_NEW) == [[0, 1, 2]]
    ids, scores = _on_fork(model, comp, ctx, batch)
    for r, q in enumerate(batch):
        ref_ids, ref_scores = _on_fork(model, comp, ctx, [q])
        assert torch.equal(ids[r], ref_ids[0]) and _close(scores[r], ref_scores[0]), (name, r)


def test_batches_keep_padding_away_from_compressions_that_could_see_it(model, data):
    ctx_ids, _ = data
    lengths = [5, 9, 5, 1]
    # never / after_prefill: the trigger cannot fire once the context is compressed, every length mixes
    for name in ("full", "snapkv"):
        ctx = kvframe.compress_context(model, _comp(name), ctx_ids)
        assert ctx._batches(lengths, None, N_NEW) == [[0, 1, 2, 3]]
        assert ctx._batches(lengths, 3, N_NEW) == [[0, 1, 2], [3]]
    # decode-time triggers fire on the question pass and every step: one length per batch
    ctx = kvframe.compress_context(model, _comp("tova_decode"), ctx_ids)
    assert ctx._batches(lengths, None, N_NEW) == [[0, 2], [1], [3]]
    # decode: every 1000 steps, no prefill compression: nothing fires within 8 new tokens, mixed is fine
    rare = _comp("tova_decode", **{"trigger.every": 1000, "trigger.prefill": False})
    quiet = kvframe.compress_context(model, rare, ctx_ids)
    assert quiet._batches(lengths, None, N_NEW) == [[0, 1, 2, 3]]
    assert quiet._batches(lengths, None, 1000) == [[0, 2], [1], [3]]
    # chunked with a scoring pass: mixed only when every question is longer than one token and fits one chunk
    ctx = kvframe.compress_context(model, _comp("kvslimmer"), ctx_ids)
    assert ctx._batches([5, 9, 5], None, N_NEW) == [[0, 1, 2]]
    assert ctx._batches(lengths, None, N_NEW) == [[0, 2], [1], [3]]
    assert ctx._batches([5, 40, 5], None, N_NEW) == [[0, 2], [1]]  # 40 > chunk size 32


def test_a_policy_drawing_while_answering_runs_questions_one_at_a_time(model, data):
    ctx_ids, qs = data
    comp = _comp("cam")  # CaM's Bernoulli value spreading draws at every decoding step
    ctx = kvframe.compress_context(model, comp, ctx_ids)
    same_length = [qs[0], qs[2], qs[0]]
    assert not ctx._draws_while_answering
    answers = ctx.generate(same_length, max_new_tokens=N_NEW, eos_token_id=None)
    assert ctx._draws_while_answering
    assert ctx._batches([5, 5, 5], None, N_NEW) == [[0], [1], [2]]
    for q, got in zip(same_length, answers):
        assert torch.equal(got, _separate(model, comp, ctx_ids, q, eos_token_id=None)[0])
    # a deterministic decode-time compressor keeps batching
    det = kvframe.compress_context(model, _comp("tova_decode"), ctx_ids)
    det.generate(same_length, max_new_tokens=N_NEW, eos_token_id=None)
    assert not det._draws_while_answering


def test_answers_stop_at_the_first_end_of_sequence_like_a_single_generate(model, data):
    ctx_ids, qs = data
    comp = _comp("snapkv")
    free = [_separate(model, comp, ctx_ids, q, eos_token_id=None)[0] for q in qs]
    eos = int(free[1][2])  # the third token generated for question 1
    ctx = kvframe.compress_context(model, comp, ctx_ids)
    answers = ctx.generate(qs, max_new_tokens=N_NEW, eos_token_id=eos)
    for q, got in zip(qs, answers):
        assert torch.equal(got, _separate(model, comp, ctx_ids, q, eos_token_id=eos)[0])
    assert len(answers[1]) == 3 and int(answers[1][-1]) == eos


@pytest.mark.parametrize("name", ["snapkv", "kvslimmer", "tova_decode"])
def test_the_context_is_prefilled_and_compressed_once(model, data, name):
    ctx_ids, qs = data
    comp = _comp(name)
    firings = {"prefill": 0, "chunk": 0, "decode": 0}
    embedded: list[int] = []
    real_step = comp.compress_step

    def counting_step(state, c, **kw):
        firings[c.phase] += 1
        return real_step(state, c, **kw)

    comp.compress_step = counting_step
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(args[0].shape[1]))
    try:
        ctx = kvframe.compress_context(model, comp, ctx_ids)
        at_prefill = dict(firings)
        prefill_tokens = sum(embedded)
        embedded.clear()
        ctx.generate(qs, max_new_tokens=N_NEW, eos_token_id=None)
    finally:
        hook.remove()
        del comp.compress_step
    n_layers = model.config.num_hidden_layers
    if name == "snapkv":
        assert at_prefill == {"prefill": n_layers, "chunk": 0, "decode": 0} and firings == at_prefill
        assert prefill_tokens == CTX
    elif name == "kvslimmer":  # chunks of 32: 3 real passes, 2 scoring passes; each compresses the past once
        assert at_prefill == {"prefill": 0, "chunk": 2 * n_layers, "decode": 0}
        assert prefill_tokens == CTX + (CTX - 32)
    else:
        assert at_prefill["prefill"] == n_layers and firings["decode"] > 0
    # answering never feeds a context token again: every pass holds question or generated tokens only
    assert embedded and max(embedded) <= max(len(q) for q in qs)


def test_context_batch_answers_each_row_as_alone(model):
    ids, mask = left_padded(2, CTX, [0, 11], seed=4)
    g = torch.Generator().manual_seed(5)
    qs = [torch.randint(3, 128, (n,), generator=g) for n in (4, 7, 6)]
    comp = _comp("snapkv")
    ctx = kvframe.compress_context(model, comp, ids, mask)
    assert ctx.batch_size == 2 and ctx.num_tokens == CTX
    answers = ctx.generate(qs, max_new_tokens=N_NEW, rows=[1, 0, 1], eos_token_id=None)
    for q, row, got in zip(qs, [1, 0, 1], answers):
        alone = ids[row, mask[row].bool()][None]
        assert torch.equal(got, _separate(model, comp, alone, q, eos_token_id=None)[0])
    # one question per row by default
    two = ctx.generate(qs[:2], max_new_tokens=N_NEW, eos_token_id=None)
    assert torch.equal(two[0], ctx.generate([qs[0]], max_new_tokens=N_NEW, rows=[0], eos_token_id=None)[0])
    with pytest.raises(ConfigError, match="batch of 2 rows and 3 questions"):
        ctx.generate(qs, max_new_tokens=N_NEW)
    fork = ctx.fork(rows=[1, 1, 0])
    assert fork.layers[0].state.batch_size == 3
    assert torch.equal(fork.layers[0].state.keys[2], ctx.cache.layers[0].state.keys[0])


def test_questions_as_a_padded_2d_tensor(model, data):
    ctx_ids, qs = data
    ctx = kvframe.compress_context(model, _comp("snapkv"), ctx_ids)
    q2d = torch.zeros(2, 9, dtype=torch.long)
    m2d = torch.zeros_like(q2d)
    q2d[0, 4:], m2d[0, 4:] = qs[0], 1
    q2d[1], m2d[1] = qs[1], 1
    got = ctx.generate(q2d, max_new_tokens=N_NEW, attention_mask=m2d, eos_token_id=None)
    want = ctx.generate(qs[:2], max_new_tokens=N_NEW, eos_token_id=None)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_in_place_writes_and_direct_use_of_the_context_cache_are_refused(model, data):
    ctx_ids, qs = data
    ctx = kvframe.compress_context(model, _comp("snapkv"), ctx_ids)
    fork = ctx.fork()
    assert fork.layers[1].state.values.data_ptr() == ctx.cache.layers[1].state.values.data_ptr()  # shared, not copied
    fork.layers[1].state.values[:, :, 0] += 1  # a write into shared storage through a view
    with pytest.raises(KVFrameError, match="layer 1 values tensor was written in place"):
        ctx.generate(qs[:1], max_new_tokens=2)
    ctx = kvframe.compress_context(model, _comp("snapkv"), ctx_ids)
    full = torch.cat([ctx_ids, qs[0][None]], 1)
    with kvframe.attach(model, ctx.compressor), torch.no_grad():
        model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=2, **{cache_argument(model): ctx.cache})
    with pytest.raises(KVFrameError, match="its own cache was run through the model"):
        ctx.fork()


def test_fork_is_usable_inside_an_open_attach_block(model, data):
    ctx_ids, qs = data
    comp = _comp("knorm")
    with kvframe.attach(model, comp):
        ctx = kvframe.compress_context(model, comp, ctx_ids)
        got = ctx.generate(qs[:2], max_new_tokens=N_NEW, eos_token_id=None)
    assert all(torch.equal(a, _separate(model, comp, ctx_ids, q, eos_token_id=None)[0]) for a, q in zip(got, qs))
    mem = ctx.memory()
    assert mem.content_slots == model.config.num_hidden_layers * model.config.num_key_value_heads * CTX // 2
    assert "knorm" in repr(ctx)


def test_bad_input_is_refused_with_what_is_accepted(model, data):
    ctx_ids, qs = data
    comp = _comp("snapkv")
    with pytest.raises(ConfigError, match="needs a kvframe Compressor"):
        kvframe.compress_context(model, "snapkv", ctx_ids)
    with pytest.raises(ConfigError, match="integer token ids; got dtype torch.float32"):
        kvframe.compress_context(model, comp, ctx_ids.float())
    with pytest.raises(ConfigError, match=r"shape \(1, 2, 40\); accepted: \[T\] or \[B, T\]"):
        kvframe.compress_context(model, comp, ctx_ids.view(1, 2, 40))
    with pytest.raises(ConfigError, match=r"attention_mask has shape \(1, 79\); accepted: the ids' shape \(1, 80\)"):
        kvframe.compress_context(model, comp, ctx_ids, torch.ones(1, 79, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"holds values \[2\]; accepted: 0 \(padding\) and 1"):
        kvframe.compress_context(model, comp, ctx_ids, torch.full((1, CTX), 2))
    right = torch.ones(1, CTX, dtype=torch.long)
    right[0, -3:] = 0
    with pytest.raises(ConfigError, match="row 0 has padding after its first token; accepted: left padding only"):
        kvframe.compress_context(model, comp, ctx_ids, right)
    with pytest.raises(ConfigError, match="context row 0 is all padding"):
        kvframe.compress_context(model, comp, ctx_ids, torch.zeros(1, CTX, dtype=torch.long))
    ctx = kvframe.compress_context(model, comp, ctx_ids)
    with pytest.raises(ConfigError, match="questions is empty"):
        ctx.generate([], max_new_tokens=2)
    with pytest.raises(ConfigError, match="question 1 has no tokens"):
        ctx.generate([qs[0], qs[0][:0]], max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"questions\[0\] has shape \(2, 5\); accepted: 1-D token ids"):
        ctx.generate([torch.stack([qs[0], qs[2]])], max_new_tokens=2)
    with pytest.raises(ConfigError, match="generate argument 'past_key_values' is set by CompressedContext.generate"):
        ctx.generate(qs[:1], max_new_tokens=2, past_key_values=ctx.fork())
    with pytest.raises(ConfigError, match=r"num_return_sequences=2; .* \(accepted: 1\)"):
        ctx.generate(qs[:1], max_new_tokens=2, num_return_sequences=2)
    with pytest.raises(ConfigError, match="max_new_tokens=0; accepted: an integer >= 1"):
        ctx.generate(qs[:1], max_new_tokens=0)
    with pytest.raises(ConfigError, match="batch_size=0; accepted: an integer >= 1"):
        ctx.generate(qs[:1], max_new_tokens=2, batch_size=0)
    with pytest.raises(ConfigError, match=r"rows holds 1; accepted: context row indices in 0\.\.0"):
        ctx.generate(qs[:1], max_new_tokens=2, rows=[1])
    with pytest.raises(ConfigError, match="rows has 2 entries for 1 questions"):
        ctx.generate(qs[:1], max_new_tokens=2, rows=[0, 0])
    with pytest.raises(ConfigError, match="attention_mask is accepted only with a 2-D tensor"):
        ctx.generate(qs[:1], max_new_tokens=2, attention_mask=torch.ones(1, 5))


@pytest.mark.parametrize("arch,name", [("gemma3", "snapkv"), ("gemma3", "streaming_llm_decode"), ("qwen2", "tova_decode")])
def test_other_architectures_and_sliding_window_layers(arch, name, data):
    """Gemma3's sliding-window layers are trimmed to their window while answering: on the fork only."""
    model = tiny_model(arch)
    ctx_ids, qs = data
    comp = _comp(name)
    ctx = kvframe.compress_context(model, comp, ctx_ids)
    before = _snapshot(ctx.cache)
    answers = ctx.generate(qs[:3], max_new_tokens=N_NEW, eos_token_id=None)
    for q, got in zip(qs, answers):
        assert torch.equal(got, _separate(model, comp, ctx_ids, q, eos_token_id=None)[0])
    assert _same(_snapshot(ctx.cache), before)
    if arch == "gemma3":
        sliding = [layer for layer in ctx.cache.layers if layer.is_sliding]
        assert sliding and all(layer.state.num_slots <= layer.sliding_window for layer in sliding)


def test_a_context_made_under_inference_mode(model, data):
    """Inference tensors carry no version counter: the context still works, answers are the same."""
    ctx_ids, qs = data
    comp = _comp("tova_decode")
    with torch.inference_mode():
        ctx = kvframe.compress_context(model, comp, ctx_ids)
        inside = ctx.generate(qs[:2], max_new_tokens=N_NEW, eos_token_id=None)
    before = _snapshot(ctx.cache)
    outside = ctx.generate(qs[:2], max_new_tokens=N_NEW, eos_token_id=None)
    refs = [_separate(model, comp, ctx_ids, q, eos_token_id=None)[0] for q in qs[:2]]
    assert all(torch.equal(a, r) and torch.equal(b, r) for a, b, r in zip(inside, outside, refs))
    assert _same(_snapshot(ctx.cache), before)
