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

Everything is implemented here with the standard library only (no ``rouge``, ``fuzzywuzzy`` or
``Levenshtein`` dependency); where the result can differ from LongBench's reference code, the
function's docstring says how.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

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


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a)·len(b)) DP, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F1 on whitespace tokens: ``P = LCS/len(pred)``, ``R = LCS/len(ref)``, ``F = 2PR/(P+R)``.

    Case-sensitive, no stemming, 0.0 when either side is empty.  LongBench calls the ``rouge``
    package (``Rouge().get_scores(...)["rouge-l"]["f"]``), which splits both texts into
    sentences on ``"."``, uses a summary-level union LCS over those sentences and an F-measure
    with ``beta = P / R``; its value equals this one when both texts are one sentence and
    ``P == R`` (e.g. identical texts) and can differ slightly otherwise.
    """
    pred, ref = prediction.split(), ground_truth.split()
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


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
    """Levenshtein distance (unit-cost insertions, deletions and substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_similarity(a: str, b: str) -> float:
    """``1 - levenshtein(a, b) / max(len(a), len(b))``; 1.0 for two empty strings."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def fuzz_ratio(a: str, b: str) -> float:
    """``fuzzywuzzy.fuzz.ratio(a, b) / 100`` as LongBench computes it (with ``python-Levenshtein``).

    ``round(100 * (1 - indel(a, b) / (len(a) + len(b)))) / 100`` where ``indel`` counts
    insertions and deletions only (``len(a) + len(b) - 2 * LCS``); 0.0 when either string is
    empty (fuzzywuzzy's convention).
    """
    if not a or not b:
        return 0.0
    total = len(a) + len(b)
    indel = total - 2 * lcs_length(a, b)
    return round(100 * (1 - indel / total)) / 100


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
) -> float:
    """Score one LongBench prediction: the task's metric, maximised over the reference answers.

    As LongBench's ``scorer``: for trec, triviaqa and samsum only the first line of the
    prediction (after stripping leading newlines) is scored.

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
    return max(metric(prediction, r) for r in refs)
