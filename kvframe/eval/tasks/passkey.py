"""Deterministic passkey-retrieval samples.

A 5-digit pass key (the *needle*) is hidden at a chosen depth inside a
*haystack* of neutral filler sentences, and the model is asked to repeat it.
The haystack is generated from hand-written template sentences filled with
names, colours, years and small numbers drawn from a seeded
:class:`random.Random`, so no third-party text is involved and the same
arguments always give the same samples.  Filler numbers have at most four
digits, so the pass key is the only 5-digit number in the context.  The
context is a pure function of its amount of filler (whole regular sentences,
then short ones for the last few tokens), which
:func:`kvframe.eval.tasks.fitting.fit_amount` fits to the requested length.

Typical use::

    samples = make_passkey_samples(tokenizer, n=10, length=2000)
    prefix, suffix = split_prompt(tokenizer, samples[0].context, samples[0].question)
    # compress the KV cache of `prefix`, then feed `suffix` and generate
    score = score_passkey(generated_text, samples[0].answer)
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvframe.errors import ConfigError
from kvframe.eval.tasks.fitting import LENGTH_TOLERANCE, Builder, LazyList, fit_amount

__all__ = [
    "DEFAULT_DEPTHS",
    "LENGTH_TOLERANCE",
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "PasskeySample",
    "build_prompt",
    "make_passkey_samples",
    "score_passkey",
    "split_prompt",
]

#: Needle sentence; ``{key}`` is replaced by the 5-digit pass key.
NEEDLE_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key."
#: Question asked after the context.
QUESTION = "What is the pass key? Answer with the number only."
#: Needle depths cycled through when ``depths`` is not given.
DEFAULT_DEPTHS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# ---------------------------------------------------------------------------
# Filler vocabulary and templates (hand-written, neutral)
# ---------------------------------------------------------------------------

_NAMES = (
    "Alma", "Bruno", "Clara", "Dario", "Elin", "Felix", "Greta", "Hugo",
    "Ines", "Jonas", "Kira", "Lukas", "Mira", "Nils", "Olga", "Pavel",
    "Rosa", "Soren", "Tilda", "Viktor",
)
_COLOURS = (
    "red", "blue", "green", "yellow", "grey", "white", "brown", "orange",
    "violet", "silver", "black", "pale", "dark green", "light blue",
)
_PLACES = (
    "the harbour", "the old mill", "the village square", "the library",
    "the train station", "the market", "the orchard", "the bakery",
    "the river bank", "the museum", "the garden", "the hill road",
)
_OBJECTS = (
    "lamp", "bicycle", "kettle", "notebook", "umbrella", "basket", "clock",
    "chair", "boat", "window", "bench", "map", "jacket", "teapot",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
)

_TEMPLATES = (
    "{name} walked to {place} on a {weekday} morning and stayed there until noon.",
    "The {colour} {object} near {place} had been there since {year}.",
    "In {month} {year}, {name} counted {number} birds above {place}.",
    "{name} and {name2} shared a pot of tea while the rain fell outside.",
    "Someone had painted the door of {place} a soft shade of {colour}.",
    "There were {number} steps between the gate and the front of {place}.",
    "{name} kept a {colour} {object} on the shelf beside the window.",
    "Every {weekday}, the bus to {place} left a few minutes late.",
    "The weather in {month} was mild, and most evenings were quiet.",
    "{name2} once said that {place} looked best just after sunrise.",
    "A small {object} was found under the bench at {place} in {year}.",
    "The clock in {place} struck {small} times before anyone noticed.",
    "{name} wrote {number} short letters during the winter of {year}.",
    "Near {place}, the path turned left and climbed gently toward the trees.",
    "The shop sold {colour} {object}s and little else that season.",
    "{name} preferred walking to cycling, especially in {month}.",
    "By the end of {month}, the garden behind {place} was full of flowers.",
    "{name2} repaired the old {object} with a piece of {colour} string.",
    "The ferry carried {number} passengers across the lake that afternoon.",
    "On {weekday} evenings the square was lit by {small} tall lamps.",
    "The records from {year} mention a {colour} boat moored at {place}.",
    "{name} and {name2} planted {number} trees along the road in {year}.",
    "It took {small} hours to walk from {place} to the coast.",
    "The wind was calm, and the water near {place} barely moved.",
    "{name} left a {colour} {object} at {place} and never came back for it.",
    "The library near {place} opened in {year} with {number} books.",
    "Most visitors arrived in {month}, when the days grew longer.",
    "A {colour} cat slept on the steps of {place} every afternoon.",
    "{name2} counted the chairs in the hall and found {number} of them.",
    "The road to {place} was repaved in {year} after a long winter.",
    "{name} liked the sound of the {object} ticking in the kitchen.",
    "During {month}, the market near {place} opened only on {weekday}s.",
    "The bridge over the river was painted {colour} in {year}.",
    "{name} borrowed a {object} from {name2} and returned it a week later.",
    "The hills behind {place} turned {colour} as the season changed.",
    "There were {small} boats in the harbour and one more on the beach.",
    "{name2} spent the whole of {month} reading by the {colour} lamp.",
    "The train from {place} arrived at {small} o'clock, as it always did.",
    "{name} noticed {number} footprints in the snow outside {place}.",
    "A quiet breeze moved the curtains while {name} finished a letter.",
)

_SHORT_TEMPLATES = (
    "It was quiet.",
    "{name} waited.",
    "The sky was {colour}.",
    "Time passed.",
    "{name2} smiled.",
    "Nothing changed.",
    "The day went on.",
    "Birds sang.",
)


# ---------------------------------------------------------------------------
# Data structures
# ---------------------------------------------------------------------------


@dataclass
class PasskeySample:
    """One passkey-retrieval sample.

    Attributes
    ----------
    id
        Stable identifier, ``"passkey-L{length}-s{seed}-{index}"``.
    context
        Haystack text containing the needle.
    question
        Question to ask after the context.
    answer
        The 5-digit pass key, as a string.
    depth
        Requested relative needle position in ``[0, 1]`` (0 = start).
    n_tokens
        Token count of ``context`` (``len(tokenizer(context).input_ids)``).
    """

    id: str
    context: str
    question: str
    answer: str
    depth: float
    n_tokens: int


class _FillerStream:
    """Endless, seeded stream of filler sentences."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _slots(self) -> dict[str, Any]:
        rng = self._rng
        name, name2 = rng.sample(_NAMES, 2)
        return {
            "name": name,
            "name2": name2,
            "colour": rng.choice(_COLOURS),
            "place": rng.choice(_PLACES),
            "object": rng.choice(_OBJECTS),
            "weekday": rng.choice(_WEEKDAYS),
            "month": rng.choice(_MONTHS),
            "year": rng.randint(1850, 2020),
            "number": rng.randint(2, 999),
            "small": rng.randint(2, 12),
        }

    def sentence(self) -> str:
        """Return the next regular filler sentence."""
        template = self._rng.choice(_TEMPLATES)
        return template.format(**self._slots())

    def short(self) -> str:
        """Return the next short filler sentence (used for fine length adjustment)."""
        template = self._rng.choice(_SHORT_TEMPLATES)
        return template.format(**self._slots())


# ---------------------------------------------------------------------------
# The context as a function of the amount of filler, and its length fit
# ---------------------------------------------------------------------------


def _count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` as measured by ``tokenizer``."""
    return len(tokenizer(text).input_ids)


def _insertion_index(sentences: Sequence[str], depth: float) -> int:
    """Index of the sentence boundary closest to ``depth`` of the filler (by characters)."""
    total = sum(len(s) + 1 for s in sentences)
    target = depth * total
    best, best_err, cumulative = 0, abs(target), 0
    for j, sentence in enumerate(sentences, start=1):
        cumulative += len(sentence) + 1
        err = abs(cumulative - target)
        if err < best_err:
            best, best_err = j, err
    return best


class _Filler:
    """Filler sentences as a pure function of an amount ``n`` of filler words.

    The filler for ``n`` words is the longest run of regular sentences with at most ``n`` words,
    then the longest run of short sentences that fits in the words left (fewer than one regular
    sentence), so the amount moves the length by a short sentence at a time while every sentence
    stays whole.  Both runs are prefixes of seeded streams, so ``n`` alone fixes the text.
    """

    def __init__(self, rng: random.Random) -> None:
        regular = _FillerStream(random.Random(rng.getrandbits(64)))
        short = _FillerStream(random.Random(rng.getrandbits(64)))
        self._regular, self._short = LazyList(regular.sentence), LazyList(short.short)
        self._regular_words = [0]  # _regular_words[q]: words in the first q regular sentences
        self._short_words = [0]

    @staticmethod
    def _prefix(items: LazyList, cumulative: list[int], words: int) -> list[str]:
        """The longest prefix of ``items`` with at most ``words`` words (``cumulative`` grows as needed)."""
        while cumulative[-1] <= words:
            cumulative.append(cumulative[-1] + len(items[len(cumulative) - 1].split()))
        return items.take(bisect.bisect_right(cumulative, words) - 1)

    def sentences(self, n: int) -> list[str]:
        regular = self._prefix(self._regular, self._regular_words, n)
        rest = n - self._regular_words[len(regular)]
        return regular + self._prefix(self._short, self._short_words, rest)


def _passkey_builder(rng: random.Random, needle: str, depth: float) -> Builder[str]:
    """The context for ``n`` filler words: the filler with ``needle`` at ``depth`` (a sentence boundary).

    The fit moves the length by one short sentence at a time, the unit named in its errors.
    """
    filler = _Filler(rng)

    def build(n: int) -> str:
        sentences = filler.sentences(n)
        j = _insertion_index(sentences, depth)
        return " ".join([*sentences[:j], needle, *sentences[j:]])

    return Builder(build, 0, None, "short filler sentence")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _validate_depths(depths: Sequence[float] | None) -> tuple[float, ...]:
    if depths is None:
        return DEFAULT_DEPTHS
    depths = tuple(float(d) for d in depths)
    if not depths:
        raise ConfigError("depths must be a non-empty list of floats in [0, 1], got []")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"depths must lie in [0, 1]; got out-of-range values {bad}")
    return depths


def _sample_seeds(seed: int, n: int) -> Iterator[int]:
    master = random.Random(seed)
    for _ in range(n):
        yield master.getrandbits(64)


def make_passkey_samples(
    tokenizer: Any,
    n: int,
    length: int,
    seed: int = 0,
    depths: list[float] | None = None,
) -> list[PasskeySample]:
    """Generate ``n`` passkey-retrieval samples of about ``length`` tokens.

    Parameters
    ----------
    tokenizer
        Callable returning an object with ``input_ids`` (any Hugging Face
        tokenizer); used to measure the context length.
    n
        Number of samples (``>= 0``).
    length
        Target context length in tokens; each context is within
        :data:`LENGTH_TOLERANCE` (5 %) of it.  Prompt-template and question
        tokens come on top.
    seed
        Seed making the output deterministic.  Sample ``i`` does not depend on
        ``n``, so a longer list extends a shorter one.
    depths
        Needle depths in ``[0, 1]``, cycled over the samples; default
        :data:`DEFAULT_DEPTHS` (0.1, 0.2, ..., 0.9).

    Returns
    -------
    list[PasskeySample]
        The samples; ``answer`` is the 5-digit pass key as a string.

    Raises
    ------
    kvframe.errors.ConfigError
        (a ``ValueError``) for a negative ``n``, a non-positive or too small ``length``, or
        depths outside ``[0, 1]``.
    """
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(length, int) or length <= 0:
        raise ConfigError(f"length must be a positive integer (tokens), got {length!r}")
    depth_cycle = _validate_depths(depths)
    if n == 0:
        return []

    samples = []
    hint: int | None = None
    for i, sample_seed in enumerate(_sample_seeds(seed, n)):
        rng = random.Random(sample_seed)
        key = str(rng.randint(10_000, 99_999))
        depth = depth_cycle[i % len(depth_cycle)]
        builder = _passkey_builder(rng, NEEDLE_TEMPLATE.format(key=key), depth)
        context, n_tokens, hint = fit_amount(
            lambda text: _count_tokens(tokenizer, text), builder, length, "a passkey context", hint
        )
        samples.append(
            PasskeySample(
                id=f"passkey-L{length}-s{seed}-{i}",
                context=context,
                question=QUESTION,
                answer=key,
                depth=depth,
                n_tokens=n_tokens,
            )
        )
    return samples


def _user_message(context: str, question: str) -> str:
    return f"{context}\n\n{question}"


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def build_prompt(tokenizer: Any, context: str, question: str, chat: bool = True) -> str:
    """Build the full prompt text for a context and a question.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    context, question
        The two parts of the single user message (joined by a blank line).
    chat
        Use the tokenizer's chat template (with the generation prompt) when it
        has one; otherwise, or when ``False``, return
        ``"{context}\\n\\n{question}\\nAnswer:"``.

    Returns
    -------
    str
        The prompt text.  Tokenize it with the tokenizer's defaults; chat
        templates usually contain the special tokens already.
    """
    content = _user_message(context, question)
    if chat and _has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(prompt, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(prompt).__name__}, not str")
        return prompt
    return f"{content}\nAnswer:"


def split_prompt(tokenizer: Any, context: str, question: str, chat: bool = True) -> tuple[str, str]:
    """Split :func:`build_prompt` into a context prefix and a question suffix.

    For query-agnostic compression: prefill and compress the KV cache of
    ``prefix``, then feed ``suffix`` (tokenized with
    ``add_special_tokens=False``) and generate.

    Returns
    -------
    tuple[str, str]
        ``(prefix, suffix)`` with ``prefix + suffix == build_prompt(...)``;
        ``prefix`` ends with the context, ``suffix`` holds the question and
        the generation prompt.

    Raises
    ------
    kvframe.errors.ConfigError
        (a ``ValueError``) if the chat template altered the context so it cannot be located.
    """
    prompt = build_prompt(tokenizer, context, question, chat=chat)
    start = prompt.rfind(_user_message(context, question))
    if start < 0:
        raise ConfigError(
            "cannot split the prompt: the chat template changed the context/question text "
            "(e.g. stripped whitespace); pass a context without leading/trailing whitespace"
        )
    cut = start + len(context)
    return prompt[:cut], prompt[cut:]


def score_passkey(prediction: str, answer: str) -> float:
    """Score a prediction: 1.0 if the pass key appears in it, else 0.0.

    The answer's digits must appear as a standalone number (not as part of a
    longer digit run), e.g. ``"The pass key is 12345."`` scores 1.0 for
    ``"12345"`` but ``"123456"`` scores 0.0.

    Raises
    ------
    kvframe.errors.ConfigError
        (a ``ValueError``) if ``answer`` contains no digits.
    """
    digits = re.sub(r"\D", "", answer)
    if not digits:
        raise ConfigError(f"answer must contain digits, got {answer!r}")
    return 1.0 if re.search(rf"(?<!\d){digits}(?!\d)", prediction) else 0.0
