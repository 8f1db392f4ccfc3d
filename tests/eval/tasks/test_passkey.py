"""Tests for kvframe.eval.tasks.passkey."""

from __future__ import annotations

import re
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvframe.eval.tasks.passkey import (
    DEFAULT_DEPTHS,
    LENGTH_TOLERANCE,
    QUESTION,
    PasskeySample,
    build_prompt,
    make_passkey_samples,
    score_passkey,
    split_prompt,
)

# ---------------------------------------------------------------------------
# Stub tokenizers
# ---------------------------------------------------------------------------


class StubTokenizer:
    """Word/punctuation tokenizer with an optional BOS token; counts calls."""

    def __init__(self, bos: bool = False) -> None:
        self.bos = bos
        self.calls = 0

    def __call__(self, text: str) -> SimpleNamespace:
        self.calls += 1
        ids = [hash(tok) % 1000 for tok in re.findall(r"\w+|[^\w\s]", text)]
        return SimpleNamespace(input_ids=([0] if self.bos else []) + ids)


class ChatStubTokenizer(StubTokenizer):
    """Stub with a minimal chat template."""

    chat_template = "stub"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        text = "<sys>You are helpful.</sys>\n"
        text += "".join(f"<{m['role']}>\n{m['content']}</{m['role']}>\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>\n"
        return text


def _needle_position(sample: PasskeySample) -> float:
    return sample.context.index(f"The pass key is {sample.answer}.") / len(sample.context)


def _within_tolerance(n_tokens: int, length: int) -> bool:
    return abs(n_tokens - length) <= LENGTH_TOLERANCE * length


# ---------------------------------------------------------------------------
# Sample generation (fast, stub tokenizer)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [64, 100, 300, 1000, 4000, 16000])
@pytest.mark.parametrize("bos", [False, True])
def test_lengths_within_tolerance(length, bos):
    tokenizer = StubTokenizer(bos=bos)
    samples = make_passkey_samples(tokenizer, n=9, length=length, seed=1)
    assert len(samples) == 9
    for sample in samples:
        assert sample.n_tokens == len(tokenizer(sample.context).input_ids)
        assert _within_tolerance(sample.n_tokens, length), (sample.n_tokens, length)


def test_sample_fields():
    samples = make_passkey_samples(StubTokenizer(), n=4, length=500, seed=7)
    assert [s.id for s in samples] == [f"passkey-L500-s7-{i}" for i in range(4)]
    assert len({s.id for s in samples}) == 4
    for sample in samples:
        assert re.fullmatch(r"\d{5}", sample.answer)
        assert sample.question == QUESTION
        needle = f"The pass key is {sample.answer}. Remember it. {sample.answer} is the pass key."
        assert sample.context.count(needle) == 1
        # The pass key is the only 5-or-more-digit number in the context.
        assert re.findall(r"\d{5,}", sample.context) == [sample.answer, sample.answer]
        assert sample.context == sample.context.strip()


@pytest.mark.parametrize("length", [1000, 8000])
def test_needle_depth(length):
    samples = make_passkey_samples(StubTokenizer(), n=9, length=length, seed=2)
    assert [s.depth for s in samples] == list(DEFAULT_DEPTHS)
    for sample in samples:
        assert abs(_needle_position(sample) - sample.depth) < 0.05, (sample.depth, _needle_position(sample))


def test_custom_depths_cycle():
    samples = make_passkey_samples(StubTokenizer(), n=5, length=2000, depths=[0.0, 1.0])
    assert [s.depth for s in samples] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert samples[0].context.startswith("The pass key is")
    assert samples[1].context.endswith(f"{samples[1].answer} is the pass key.")


def test_default_depths_cycle_past_nine():
    samples = make_passkey_samples(StubTokenizer(), n=11, length=200)
    assert [s.depth for s in samples] == [*DEFAULT_DEPTHS, 0.1, 0.2]


def test_deterministic():
    a = make_passkey_samples(StubTokenizer(), n=5, length=800, seed=11)
    b = make_passkey_samples(StubTokenizer(), n=5, length=800, seed=11)
    assert [asdict(s) for s in a] == [asdict(s) for s in b]


def test_seed_changes_output():
    a = make_passkey_samples(StubTokenizer(), n=5, length=800, seed=0)
    b = make_passkey_samples(StubTokenizer(), n=5, length=800, seed=1)
    assert [s.answer for s in a] != [s.answer for s in b]
    assert all(x.context != y.context for x, y in zip(a, b))


def test_samples_independent_of_n():
    short = make_passkey_samples(StubTokenizer(), n=3, length=600, seed=5)
    long = make_passkey_samples(StubTokenizer(), n=6, length=600, seed=5)
    assert short == long[:3]


def test_samples_differ_from_each_other():
    samples = make_passkey_samples(StubTokenizer(), n=9, length=600)
    assert len({s.context for s in samples}) == 9
    assert len({s.answer for s in samples}) > 1


def test_tokenizer_calls_are_bounded():
    """The full text is re-tokenized only a few times per sample, not per sentence."""
    tokenizer = StubTokenizer()
    make_passkey_samples(tokenizer, n=4, length=8000)
    # ~350 filler sentences per sample; a handful of calls each is expected.
    assert tokenizer.calls <= 4 * 10 + 5


def test_zero_samples():
    assert make_passkey_samples(StubTokenizer(), n=0, length=100) == []


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n": -1, "length": 100}, "-1"),
        ({"n": 1, "length": 0}, "0"),
        ({"n": 1, "length": 100, "depths": [0.5, 1.5]}, "1.5"),
        ({"n": 1, "length": 100, "depths": []}, "depths"),
        ({"n": 1, "length": 5}, "too small"),
    ],
)
def test_invalid_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        make_passkey_samples(StubTokenizer(), **kwargs)


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def test_build_prompt_plain_without_template():
    prompt = build_prompt(StubTokenizer(), "CONTEXT", "QUESTION?")
    assert prompt == "CONTEXT\n\nQUESTION?\nAnswer:"


def test_build_prompt_uses_chat_template():
    prompt = build_prompt(ChatStubTokenizer(), "CONTEXT", "QUESTION?")
    assert prompt == "<sys>You are helpful.</sys>\n<user>\nCONTEXT\n\nQUESTION?</user>\n<assistant>\n"


def test_build_prompt_chat_false():
    assert build_prompt(ChatStubTokenizer(), "C", "Q", chat=False) == "C\n\nQ\nAnswer:"


@pytest.mark.parametrize("tokenizer", [StubTokenizer(), ChatStubTokenizer()])
@pytest.mark.parametrize("chat", [True, False])
def test_split_prompt_on_samples(tokenizer, chat):
    sample = make_passkey_samples(tokenizer, n=1, length=300)[0]
    prefix, suffix = split_prompt(tokenizer, sample.context, sample.question, chat=chat)
    assert prefix + suffix == build_prompt(tokenizer, sample.context, sample.question, chat=chat)
    assert prefix.endswith(sample.context)
    assert sample.answer in prefix
    assert suffix.startswith("\n\n" + sample.question)
    assert sample.answer not in suffix


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(context=_text, question=_text, chat=st.booleans(), templated=st.booleans())
def test_split_prompt_concatenation_property(context, question, chat, templated):
    tokenizer = ChatStubTokenizer() if templated else StubTokenizer()
    prefix, suffix = split_prompt(tokenizer, context, question, chat=chat)
    assert prefix + suffix == build_prompt(tokenizer, context, question, chat=chat)
    assert prefix.endswith(context)
    assert question in suffix


def test_split_prompt_rejects_altered_context():
    class TrimmingTokenizer(ChatStubTokenizer):
        def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
            return "<user>" + messages[0]["content"].strip() + "</user>"

    with pytest.raises(ValueError, match="cannot split"):
        split_prompt(TrimmingTokenizer(), "  padded context  ", "Q?")


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("12345", 1.0),
        ("The pass key is 12345.", 1.0),
        ("  12345\n", 1.0),
        ("Answer: 12345 is the pass key", 1.0),
        ("1234", 0.0),
        ("123456", 0.0),
        ("012345", 0.0),
        ("54321", 0.0),
        ("", 0.0),
        ("The pass key is twelve thousand.", 0.0),
        ("11111 then 12345", 1.0),
    ],
)
def test_score_passkey(prediction, expected):
    assert score_passkey(prediction, "12345") == expected


def test_score_passkey_answer_with_spaces():
    assert score_passkey("key: 12345", " 12345 ") == 1.0


def test_score_passkey_rejects_answer_without_digits():
    with pytest.raises(ValueError, match="abc"):
        score_passkey("12345", "abc")


# ---------------------------------------------------------------------------
# Real SmolLM2 tokenizer / model (slow); `smollm2` is the session fixture
# from tests/conftest.py.
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("length", [128, 1000, 4000])
def test_smollm2_lengths_and_depths(smollm2, length):
    _, tokenizer = smollm2
    samples = make_passkey_samples(tokenizer, n=9, length=length, seed=3)
    for sample in samples:
        assert sample.n_tokens == len(tokenizer(sample.context).input_ids)
        assert _within_tolerance(sample.n_tokens, length), (sample.n_tokens, length)
        if length >= 1000:
            assert abs(_needle_position(sample) - sample.depth) < 0.05


@pytest.mark.slow
def test_smollm2_deterministic(smollm2):
    _, tokenizer = smollm2
    a = make_passkey_samples(tokenizer, n=3, length=500, seed=9)
    b = make_passkey_samples(tokenizer, n=3, length=500, seed=9)
    assert a == b


@pytest.mark.slow
def test_smollm2_split_prompt_tokenizes_consistently(smollm2):
    """prefix tokens + suffix tokens (no special tokens) == full prompt tokens."""
    _, tokenizer = smollm2
    sample = make_passkey_samples(tokenizer, n=1, length=500)[0]
    prompt = build_prompt(tokenizer, sample.context, sample.question)
    assert prompt.endswith("<|im_start|>assistant\n")
    prefix, suffix = split_prompt(tokenizer, sample.context, sample.question)
    assert prefix + suffix == prompt
    joined = tokenizer(prefix).input_ids + tokenizer(suffix, add_special_tokens=False).input_ids
    assert joined == tokenizer(prompt).input_ids


@pytest.mark.slow
def test_smollm2_solves_short_passkeys(smollm2):
    import torch

    model, tokenizer = smollm2
    samples = make_passkey_samples(tokenizer, n=3, length=256, seed=0)
    scores = []
    for sample in samples:
        enc = tokenizer(build_prompt(tokenizer, sample.context, sample.question), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        prediction = tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        scores.append(score_passkey(prediction, sample.answer))
    assert sum(scores) >= 2
