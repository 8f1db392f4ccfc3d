"""Scoring rules of RULER and LongBench, as pure functions.

- **RULER** (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
  Models?", arXiv 2404.06654) scores a generation by case-insensitive substring matching:
  :func:`string_match_all` (the fraction of the reference strings found, used for the NIAH,
  variable-tracking and word-extraction tasks) and :func:`string_match_part` (1 if any reference
  is found, used for QA).  RULER reports these times 100; here they are in ``[0, 1]``.
- **LongBench** (Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context
  Understanding", arXiv 2308.14508) uses one metric per dataset (:data:`LONGBENCH_METRICS`):
  token-level F1 after SQuAD-style normalisation (:func:`qa_f1_score`), ROUGE-L
  (:func:`rouge_l_score`), a class-name matching rule (:func:`classification_score`), number
  matching (:func:`count_score`, :func:`retrieval_score`) and an edit similarity of the first code
  line (:func:`code_sim_score`).  A sample's score is the maximum over its reference answers
  (:func:`longbench_score`).  Every value is in ``[0, 1]`` (LongBench reports them times 100).

String distances come from ``rapidfuzz`` (Levenshtein and indel distances, longest common
subsequences), ROUGE-L from Google's ``rouge-score`` (standard ROUGE-L) or, for LongBench's exact
numbers, from the ``rouge`` package that LongBench itself calls; the rest (normalisation, token F1,
number and class matching) is LongBench's few lines, written here.  Where a function can differ
from LongBench's reference code, its docstring says how and how to get LongBench's value
(``longbench_exact=True``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any

from rapidfuzz import fuzz
from rapidfuzz.distance import LCSseq, Levenshtein
from rouge import Rouge

from kvframe.errors import ConfigError, unknown_name

__all__ = [
    "LONGBENCH_FIRST_LINE_TASKS",
    "LONGBENCH_METRICS",
    "classification_score",
    "code_sim_score",
    "count_score",
    "edit_similarity",
    "fuzz_ratio",
    "lcs_length",
    "levenshtein",
    "longbench_score",
    "normalize_answer",
    "qa_f1_score",
    "retrieval_score",
    "rouge_l_score",
    "string_match_all",
    "string_match_part",
    "token_f1",
]


# ---------------------------------------------------------------------------
# RULER
# ---------------------------------------------------------------------------


def _as_refs(refs: str | Iterable[str]) -> list[str]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ConfigError("at least one reference string is needed to score a prediction, got none")
    return refs


def string_match_all(prediction: str, refs: str | Iterable[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``refs`` contained in ``prediction``.

    Matching is case-insensitive substring containment, exactly RULER's
    ``sum(r.lower() in pred.lower() for r in refs) / len(refs)``.  E.g. references
    ``["123", "456"]`` and prediction ``"The numbers are 123 and 789"`` score 0.5.
    """
    refs = _as_refs(refs)
    pred = prediction.lower()
    return sum(1.0 if r.lower() in pred else 0.0 for r in refs) / len(refs)


def string_match_part(prediction: str, refs: str | Iterable[str]) -> float:
    """RULER's ``string_match_part`` (QA rule): 1.0 if any of ``refs`` is in ``prediction``.

    Case-insensitive substring containment, ``max(r.lower() in pred.lower() for r in refs)``.
    """
    refs = _as_refs(refs)
    pred = prediction.lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in refs)


# ---------------------------------------------------------------------------
# LongBench: QA F1
# ---------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench's (SQuAD's) answer normalisation.

    Lower-case, drop ASCII punctuation, replace the articles ``a``/``an``/``the`` by spaces and
    collapse whitespace: ``"The Cat!"`` -> ``"cat"``.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 of two token lists with multiset (``Counter``) overlap; 0.0 when nothing is shared."""
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """LongBench ``qa_f1_score``: token F1 of the normalised prediction and reference.

    ``qa_f1_score("The Cat!", "cat") == 1.0``; ``qa_f1_score("black cat", "cat")`` = 2/3.
    """
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


# ---------------------------------------------------------------------------
# LongBench: ROUGE-L
# ---------------------------------------------------------------------------


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of two strings or two token lists.

    ``rapidfuzz.distance.LCSseq.similarity``, which takes any sequences of hashable items.
    """
    return int(LCSseq.similarity(a, b))


class _WhitespaceTokenizer:
    """``str.split()`` tokens for ``rouge-score``: case kept, punctuation kept, any script."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


@cache
def _rouge_l_scorer() -> Any:
    # imported on first use: rouge_score imports nltk (about 0.3 s)
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_WhitespaceTokenizer())


def _longbench_rouge_l(prediction: str, ground_truth: str) -> float:
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except (ValueError, RecursionError):  # LongBench: any exception scores 0.0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_l_score(prediction: str, ground_truth: str, longbench_exact: bool = False) -> float:
    """ROUGE-L F1 of a prediction against a reference.

    **Default** -- the standard sentence-level ROUGE-L of Google's ``rouge-score``
    (``RougeScorer(["rougeL"], use_stemmer=False)``) on whitespace tokens (``str.split()``):
    ``P = LCS/len(pred)``, ``R = LCS/len(ref)``, ``F = 2PR/(P+R)``; case-sensitive, punctuation
    stays part of its word, no stemming, 0.0 when either side has no token.  The whitespace
    tokenizer replaces ``rouge-score``'s default one, which lower-cases and keeps only
    ``[a-z0-9]`` runs: that one would score any non-ASCII text (accents, CJK) 0 or in pieces and
    ignore case and punctuation, which LongBench does not.

    **longbench_exact=True** -- LongBench's number: it calls the ``rouge`` package
    (``Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]``, default
    options), and so does this.  That package splits each text into sentences at every ``"."``,
    counts *distinct* words (``"a b a b"`` has 2), takes the union of the LCS words of each
    reference sentence against all predicted sentences (as a set of words), and returns
    ``2PR / (P + R + 1e-8)``; as in LongBench, an exception inside it (an empty prediction or
    reference, or Python's recursion limit, which its recursive LCS reconstruction can reach on
    two sentences of about 1000 words together) scores 0.0.  The two agree for single-sentence texts without repeated words (up to the ``1e-8``)
    and can differ otherwise: ``"the cat sat on the mat"`` against ``"the cat lay on the mat"``
    is 5/6 by default and 0.8 exact (4 of 5 distinct words).
    """
    if longbench_exact:
        return _longbench_rouge_l(prediction, ground_truth)
    return float(_rouge_l_scorer().score(ground_truth, prediction)["rougeL"].fmeasure)


# ---------------------------------------------------------------------------
# LongBench: classification, counting, retrieval
# ---------------------------------------------------------------------------


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """LongBench ``classification_score`` (trec).

    Every class name occurring (case-sensitive substring) in ``prediction`` is a match; matches
    that are a strict substring of ``ground_truth`` are then dropped; the score is
    ``1 / len(matches)`` if ``ground_truth`` is among the matches, else 0.  E.g. classes
    ``["Food", "Animal", "Sport"]``, reference ``"Food"``: ``"Food"`` -> 1.0,
    ``"Food or Sport"`` -> 0.5, ``"Animal"`` -> 0.0.

    The dropping loop reproduces LongBench's code exactly, which removes items from the list it
    iterates over, so a match right after a dropped one is not examined (it matters only when
    two consecutive matches are both strict substrings of the reference).
    """
    matches = [c for c in all_classes if c in prediction]
    for term in matches:  # mutating while iterating: deliberate, as in LongBench
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == target) / len(numbers)


def count_score(prediction: str, ground_truth: str) -> float:
    """LongBench ``count_score`` (passage_count): fraction of the numbers in ``prediction`` equal to ``ground_truth``.

    ``count_score("There are 5 passages, not 3", "5") == 0.5``; 0.0 when no number is predicted.
    """
    return _fraction_equal(prediction, str(ground_truth).strip())


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """LongBench ``retrieval_score`` (passage_retrieval_en).

    The reference is like ``"Paragraph 12"``; the score is the fraction of the numbers in
    ``prediction`` equal to that paragraph number (0.0 when none is predicted).

    Raises
    ------
    kvframe.errors.ConfigError
        If ``ground_truth`` does not contain ``"Paragraph <number>"``.
    """
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ConfigError(f"retrieval reference must look like 'Paragraph 12', got {ground_truth!r}")
    return _fraction_equal(prediction, found[0])


# ---------------------------------------------------------------------------
# LongBench: code similarity
# ---------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions and substitutions) over code points.

    ``rapidfuzz.distance.Levenshtein.distance``.
    """
    return int(Levenshtein.distance(a, b))


def edit_similarity(a: str, b: str) -> float:
    """``1 - levenshtein(a, b) / max(len(a), len(b))``; 1.0 for two empty strings.

    ``rapidfuzz.distance.Levenshtein.normalized_similarity``.
    """
    if a == b:
        return 1.0
    return float(Levenshtein.normalized_similarity(a, b))


def fuzz_ratio(a: str, b: str) -> float:
    """``fuzzywuzzy.fuzz.ratio(a, b) / 100``, LongBench's code similarity.

    ``round(rapidfuzz.fuzz.ratio(a, b)) / 100``: ``100 * (1 - indel(a, b) / (len(a) + len(b)))``
    where ``indel`` counts insertions and deletions only (``len(a) + len(b) - 2 * LCS``), rounded
    to whole percents half to even as fuzzywuzzy does (``int(round(x))``: 62.5 -> 62).  As in
    fuzzywuzzy, equal strings score 1.0 (two empty ones included) and otherwise an empty string
    scores 0.0.  This is fuzzywuzzy's value with ``python-Levenshtein`` installed, and that of its
    successor ``thefuzz`` (built on rapidfuzz).  fuzzywuzzy without ``python-Levenshtein`` (what
    LongBench's own requirements install) falls back to ``difflib.SequenceMatcher``, whose
    matching blocks are not a longest common subsequence: on pairs of nearby lines of real Python
    source its percentage differs for about 4 pairs in 10 (by 2.7 points on average).
    """
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return round(fuzz.ratio(a, b, processor=None)) / 100


def _first_code_line(prediction: str) -> str:
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, longbench_exact: bool = False) -> float:
    """LongBench ``code_sim_score`` (lcc, repobench-p): similarity of the first code line.

    The predicted line is the first line of ``prediction`` (leading newlines stripped) that
    contains no backtick, ``#`` or ``//`` (LongBench's rule: such lines are markdown fences or
    comments; note that it skips any line *containing* them, not only lines starting with them),
    or ``""`` if there is none.  It is compared with ``ground_truth`` by
    :func:`edit_similarity` (``1 - Levenshtein / max length``).  LongBench uses
    ``fuzz.ratio / 100`` instead (:func:`fuzz_ratio`: insertion/deletion distance over the summed
    length, rounded to whole percents); pass ``longbench_exact=True`` for that.  Both are 1.0
    for an exact match; the edit similarity is usually lower for partial matches (a substitution
    costs 1 over ``max(len)`` instead of 2 over ``len(a) + len(b)``).
    """
    line = _first_code_line(prediction)
    return fuzz_ratio(line, ground_truth) if longbench_exact else edit_similarity(line, ground_truth)


# ---------------------------------------------------------------------------
# LongBench: task -> metric
# ---------------------------------------------------------------------------

#: LongBench's 16 English datasets and their metric (LongBench's ``dataset2metric``).
LONGBENCH_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_l_score,
    "qmsum": rouge_l_score,
    "multi_news": rouge_l_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_l_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

#: Datasets whose prediction LongBench cuts to its first line before scoring (few-shot tasks).
LONGBENCH_FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum"})


def longbench_score(
    task: str,
    prediction: str,
    answers: str | Iterable[str],
    all_classes: Sequence[str] | None = None,
    longbench_exact: bool = False,
) -> float:
    """Score one LongBench prediction: the task's metric, maximised over the reference answers.

    As LongBench's ``scorer``: for trec, triviaqa and samsum only the first line of the
    prediction (after stripping leading newlines) is scored.  ``longbench_exact`` is passed to
    the metrics that have it (:func:`rouge_l_score` for gov_report, qmsum, multi_news and samsum;
    :func:`code_sim_score` for lcc and repobench-p): ``True`` gives LongBench's own numbers, the
    default the standard ROUGE-L and the edit similarity; the other metrics are LongBench's
    either way.

    Raises
    ------
    kvframe.errors.UnknownNameError
        For a task not in :data:`LONGBENCH_METRICS`.
    kvframe.errors.ConfigError
        For no answers, or trec without ``all_classes``.
    """
    if task not in LONGBENCH_METRICS:
        raise unknown_name("LongBench task", task, LONGBENCH_METRICS)
    metric = LONGBENCH_METRICS[task]
    refs = _as_refs(answers)
    if task in LONGBENCH_FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if metric is classification_score:
        if all_classes is None:
            raise ConfigError(f"LongBench task {task!r} needs all_classes (the list of class names)")
        return max(classification_score(prediction, r, all_classes) for r in refs)
    if metric is rouge_l_score or metric is code_sim_score:
        return max(metric(prediction, r, longbench_exact=longbench_exact) for r in refs)
    return max(metric(prediction, r) for r in refs)
