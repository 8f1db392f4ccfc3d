"""kvframe.eval.tasks.fitting: the length fit shared by the passkey, RULER and needle tasks."""

from __future__ import annotations

import random
import re

import pytest

from kvframe.errors import ConfigError
from kvframe.eval.tasks import passkey
from kvframe.eval.tasks.fitting import LENGTH_TOLERANCE, Builder, LazyList, fit_amount


def _words(text: str) -> int:
    return len(text.split())


def test_fit_amount_measures_each_amount_once_and_tries_the_hint_first():
    built: list[int] = []

    def build(n: int) -> str:
        built.append(n)
        return "w " * (3 * n + 10)

    text, tokens, n = fit_amount(_words, Builder(build, 0, None, "unit"), 1000, "test")
    assert tokens == _words(text) == 3 * n + 10 and abs(tokens - 1000) <= 0.01 * 1000
    assert len(built) == len(set(built)) <= 6
    built.clear()
    assert fit_amount(_words, Builder(build), 1000, "test", hint=n) == (text, tokens, n)
    assert built == [0, n]


def test_fit_amount_errors_name_what_is_fitted():
    with pytest.raises(ConfigError, match=r"too small for the thing: .* 50 tokens"):
        fit_amount(_words, Builder(lambda n: "w " * (50 + n)), 40, "the thing")
    with pytest.raises(ConfigError, match=r"too large for the thing: .* at most 60 tokens"):
        fit_amount(_words, Builder(lambda n: "w " * (50 + n), 0, 10), 1000, "the thing")
    with pytest.raises(ConfigError, match=r"one block is too coarse"):
        fit_amount(_words, Builder(lambda n: "w " * (100 * n + 1), 0, None, "block"), 250, "the thing")


def test_lazy_list_prefixes_never_change():
    rng = random.Random(0)
    items = LazyList(lambda: str(rng.random()))
    five = items.take(5)
    assert items[7] == items.take(8)[7] and items.take(5) == five and items.take(2) == five[:2]


def test_passkey_builder_is_a_pure_function_of_the_amount():
    def builder():
        return passkey._passkey_builder(random.Random(3), "NEEDLE.", 0.5)

    amounts = [0, 1, 40, 7, 300, 41, 0, 299]
    a, b = builder(), builder()
    assert [a.build(n) for n in amounts] == [b.build(n) for n in reversed(amounts)][::-1]
    assert a.build(40) == a.build(40) and builder().build(40) == a.build(40)


def test_passkey_filler_is_whole_sentences_within_a_short_sentence_of_the_amount():
    filler = passkey._Filler(random.Random(5))
    slots = {"name": "Alma", "name2": "Hugo", "colour": "dark green"}
    longest_short = max(_words(t.format(**slots)) for t in passkey._SHORT_TEMPLATES)
    for n in range(400):
        sentences = filler.sentences(n)
        words = sum(_words(s) for s in sentences)
        assert n - longest_short < words <= n
        assert all(re.fullmatch(r"[A-Z].*[.]", s) for s in sentences)


def test_tolerance_is_shared():
    from kvframe.eval.tasks import ruler

    assert passkey.LENGTH_TOLERANCE is ruler.LENGTH_TOLERANCE is LENGTH_TOLERANCE
