"""Deterministic passkey-retrieval samples.

A 5-digit pass key (the *needle*) is hidden at a chosen depth inside a
*haystack* of neutral filler sentences, and the model is asked to repeat it.
The haystack is generated from hand-written template sentences filled with
names, colours, years and small numbers drawn from a seeded
:class:`random.Random`, so no third-party text is involved and the same
arguments always give the same samples.  Filler numbers have at most four
digits, so the pass key is the only 5-digit number in the context.

Typical use::

    samples = make_passkey_samples(tokenizer, n=10, length=2000)
    prefix, suffix = split_prompt(tokenizer, samples[0].context, samples[0].question)
    # compress the KV cache of `prefix`, then feed `suffix` and generate
    score = score_passkey(generated_text, samples[0].answer)
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvframe.errors import ConfigError

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
#: Relative tolerance of the context length in tokens.
LENGTH_TOLERANCE = 0.05
#: Needle depths cycled through when ``depths`` is not given.
DEFAULT_DEPTHS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: Length accuracy the fit aims for before settling for LENGTH_TOLERANCE.
_TARGET_TOLERANCE = 0.01
_TARGET_MIN_TOKENS = 6
_MAX_FIT_ITERS = 12
_CALIBRATION_SENTENCES = 64

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
# Token counting and length fitting
# ---------------------------------------------------------------------------


def _count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` as measured by ``tokenizer``."""
    return len(tokenizer(text).input_ids)


def _tokens_per_char(tokenizer: Any, seed: int) -> float:
    """Estimate the tokenizer's tokens-per-character ratio on filler text."""
    stream = _FillerStream(random.Random(f"kvframe-passkey-calibration-{seed}"))
    text = " ".join(stream.sentence() for _ in range(_CALIBRATION_SENTENCES))
    n = _count_tokens(tokenizer, text) - _count_tokens(tokenizer, "")
    return max(n, 1) / len(text)


def _insertion_index(estimates: Sequence[float], depth: float) -> int:
    """Index of the sentence boundary closest to ``depth`` of the filler tokens."""
    total = sum(estimates)
    target = depth * total
    best, best_err, cumulative = 0, abs(target), 0.0
    for j, est in enumerate(estimates, start=1):
        cumulative += est
        err = abs(cumulative - target)
        if err < best_err:
            best, best_err = j, err
    return best


def _assemble(sentences: Sequence[str], estimates: Sequence[float], needle: str, depth: float) -> str:
    """Join the filler sentences with the needle inserted at ``depth``."""
    j = _insertion_index(estimates, depth)
    return " ".join([*sentences[:j], needle, *sentences[j:]])


@dataclass
class _Haystack:
    """Mutable filler state used while fitting a context to a token budget."""

    stream: _FillerStream
    tokens_per_char: float
    sentences: list[str]
    estimates: list[float]
    pending: str | None = None

    def _estimate(self, sentence: str) -> float:
        return (len(sentence) + 1) * self.tokens_per_char

    def _peek(self) -> str:
        if self.pending is None:
            self.pending = self.stream.sentence()
        return self.pending

    def _push(self, sentence: str) -> float:
        est = self._estimate(sentence)
        self.sentences.append(sentence)
        self.estimates.append(est)
        return est

    def grow(self, tokens: float, margin: float) -> None:
        """Add roughly ``tokens`` tokens, ending within ``margin`` below the goal."""
        added = 0.0
        while added + self._estimate(self._peek()) <= tokens:
            added += self._push(self._peek())
            self.pending = None
        while added < tokens - margin:
            added += self._push(self.stream.short())
        if added == 0.0:
            self._push(self.stream.short())

    def shrink(self, tokens: float, margin: float) -> None:
        """Remove roughly ``tokens`` tokens from the end (at least one sentence)."""
        removed = 0.0
        while self.sentences and (removed == 0.0 or removed < tokens - margin):
            self.sentences.pop()
            removed += self.estimates.pop()


def _fit_context(
    tokenizer: Any,
    stream: _FillerStream,
    needle: str,
    depth: float,
    length: int,
    tokens_per_char: float,
) -> tuple[str, int]:
    """Build a context of about ``length`` tokens around ``needle``.

    Sentences are added using a per-character token estimate; the whole
    context is then measured and sentences are added or removed in bulk, so
    the full text is tokenized only a handful of times.  The fit aims at
    :data:`_TARGET_TOLERANCE` (1 %, at least a few tokens) and accepts the
    closest attempt within :data:`LENGTH_TOLERANCE` (5 %).

    Returns
    -------
    tuple[str, int]
        The context and its measured token count.
    """
    lo = math.ceil(length * (1 - LENGTH_TOLERANCE))
    hi = math.floor(length * (1 + LENGTH_TOLERANCE))
    tight = min(hi - length, length - lo, max(length * _TARGET_TOLERANCE, _TARGET_MIN_TOKENS))
    margin = max(tight / 2, 1.0)
    hay = _Haystack(stream, tokens_per_char, [], [])

    n = _count_tokens(tokenizer, needle)
    if n > hi:
        raise ConfigError(f"length={length} is too small: the needle alone is {n} tokens")
    hay.grow(length - n, margin)
    best: tuple[str, int] | None = None
    for _ in range(_MAX_FIT_ITERS):
        context = _assemble(hay.sentences, hay.estimates, needle, depth)
        n = _count_tokens(tokenizer, context)
        if lo <= n <= hi and (best is None or abs(n - length) < abs(best[1] - length)):
            best = (context, n)
        if abs(n - length) <= tight:
            return context, n
        if n < length:
            hay.grow(length - n, margin)
        elif hay.sentences:
            hay.shrink(n - length, margin)
        elif n > hi:
            raise ConfigError(f"length={length} is too small: the needle alone is {n} tokens")
        else:
            break
    if best is not None:
        return best
    raise RuntimeError(
        f"could not fit a passkey context to {length} tokens (+/-{LENGTH_TOLERANCE:.0%}); "
        f"last attempt had {n} tokens"
    )


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

    tokens_per_char = _tokens_per_char(tokenizer, seed)
    samples = []
    for i, sample_seed in enumerate(_sample_seeds(seed, n)):
        rng = random.Random(sample_seed)
        key = str(rng.randint(10_000, 99_999))
        depth = depth_cycle[i % len(depth_cycle)]
        needle = NEEDLE_TEMPLATE.format(key=key)
        context, n_tokens = _fit_context(tokenizer, _FillerStream(rng), needle, depth, length, tokens_per_char)
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
