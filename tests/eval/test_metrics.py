"""kvframe.eval.metrics: RULER and LongBench scoring rules on hand-made cases."""

from __future__ import annotations

import pytest

from kvframe.errors import ConfigError, UnknownNameError
from kvframe.eval.metrics import (
    LONGBENCH_METRICS,
    classification_score,
    code_sim_score,
    count_score,
    edit_similarity,
    fuzz_ratio,
    lcs_length,
    levenshtein,
    longbench_score,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
    string_match_all,
    string_match_part,
    token_f1,
)

# ---------------------------------------------------------------------------
# RULER
# ---------------------------------------------------------------------------


def test_string_match_all_is_fraction_found_case_insensitive():
    assert string_match_all("The numbers are 123 and 789", ["123", "456"]) == 0.5
    assert string_match_all("ABC-def", ["abc", "DEF"]) == 1.0
    assert string_match_all("", ["1", "2", "3"]) == 0.0
    assert string_match_all("a 1 b 3", ["1", "2", "3"]) == pytest.approx(2 / 3)
    assert string_match_all("1234567", "1234567") == 1.0  # a single reference string


def test_string_match_part_is_max_over_refs():
    assert string_match_part("It is PARIS.", ["paris", "London"]) == 1.0
    assert string_match_part("Rome", ["paris", "London"]) == 0.0
    assert string_match_part("", ["x"]) == 0.0


def test_ruler_rules_need_references():
    with pytest.raises(ConfigError):
        string_match_all("x", [])
    with pytest.raises(ConfigError):
        string_match_part("x", [])


# ---------------------------------------------------------------------------
# LongBench QA F1
# ---------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  The  Quick, brown-fox!  ") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_qa_f1_values():
    assert qa_f1_score("The Cat!", "cat") == 1.0
    # [black, cat, sat] vs [black, dog]: 1 shared, P = 1/3, R = 1/2 -> F1 = 0.4
    assert qa_f1_score("a black cat sat", "the black dog") == pytest.approx(0.4)
    # multiset overlap: "cat cat" vs "cat" shares one token, P = 1/2, R = 1 -> 2/3
    assert qa_f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert qa_f1_score("", "cat") == 0.0
    assert qa_f1_score("the", "a") == 0.0  # both normalise to nothing
    assert token_f1(["a", "b"], ["b", "c", "d"]) == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


# ---------------------------------------------------------------------------
# LongBench ROUGE-L
# ---------------------------------------------------------------------------


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], ["a"]) == 0
    assert lcs_length("abc", "abc") == 3


def test_rouge_l_hand_cases():
    # LCS "the cat on the mat" = 5 of 6 tokens each -> P = R = F = 5/6
    assert rouge_l_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2: P = 2/4, R = 2/3 -> F = 4/7
    assert rouge_l_score("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l_score("same words here", "same words here") == 1.0
    assert rouge_l_score("", "x") == 0.0
    assert rouge_l_score("x y", "z") == 0.0


def test_rouge_l_tokens_are_whitespace_words_of_any_script():
    # case and punctuation are part of a token: "The"/"the" and "sat."/"sat" differ
    assert rouge_l_score("The cat sat.", "the cat sat") == pytest.approx(1 / 3)
    # any Unicode whitespace separates tokens (no-break space, ideographic space, newline)
    assert rouge_l_score("a\u00a0b\u3000c\nd", "a b c d") == 1.0
    # accented words stay whole: [héllo, wörld] vs [héllo, world] share 1 of 2 -> 0.5
    assert rouge_l_score("héllo wörld", "héllo world") == 0.5
    # pre-segmented Chinese: [猫, 坐, 在] vs [猫, 在], LCS 2: P = 2/3, R = 1 -> F = 0.8
    assert rouge_l_score("猫 坐 在", "猫 在") == pytest.approx(0.8)
    # an unsegmented CJK string is one token
    assert rouge_l_score("猫坐在垫子上", "猫坐在垫子上") == 1.0
    assert rouge_l_score("猫坐在", "猫坐在垫子上") == 0.0
    # repeated tokens count with their multiplicity: LCS [a, b] = 2: P = 2/4, R = 1 -> 2/3
    assert rouge_l_score("a b a b", "a b") == pytest.approx(2 / 3)
    # nothing but whitespace is no token
    assert rouge_l_score(" \n\t", "x") == 0.0
    assert rouge_l_score("x", "   ") == 0.0
    assert rouge_l_score("", "") == 0.0


# LongBench's ROUGE-L (the `rouge` package): sentences split at ".", distinct words, the union of
# LCS words over sentences, F = 2PR / (P + R + 1e-8); the 1e-8 is why these are approx
LB = pytest.approx


def test_rouge_l_longbench_exact_hand_cases():
    def exact(p, r):
        return rouge_l_score(p, r, longbench_exact=True)

    # distinct words {the, cat, sat|lay, on, mat} = 5 each; LCS words {the, cat, on, mat} = 4 -> P = R = 0.8
    assert exact("the cat sat on the mat", "the cat lay on the mat") == LB(0.8)
    # no repeated word, one sentence: the standard value 4/7
    assert exact("a b c d", "a c e") == LB(4 / 7)
    assert exact("same words here", "same words here") == LB(1.0)
    # distinct words: {a, b} against {a, b} -> 1 (standard ROUGE-L: 2/3)
    assert exact("a b a b", "a b") == LB(1.0)
    # "a. b. c" is three sentences whose LCS words with "a b c" are a, b, c -> 1 (standard: 1/3)
    assert exact("a. b. c", "a b c") == LB(1.0)
    # case-sensitive, and "." is a separator, not part of a word: {The, Cat, sat} vs {the, cat, sat} -> 1/3
    assert exact("The Cat sat.", "the cat sat") == LB(1 / 3)
    # "x. " is the sentences ["x", ""]: the empty word counts, P = 1/2, R = 1 -> 2/3
    assert exact("x. ", "x") == LB(2 / 3)
    # the package raises on an empty prediction (also "..." which has no sentence); LongBench scores 0
    assert exact("", "x") == 0.0
    assert exact("...", "x") == 0.0
    assert exact("x y", "z") == 0.0


def test_longbench_score_exact_switches_rouge_and_code_metrics():
    pred, ref = "the cat sat on the mat", ["the cat lay on the mat"]
    assert longbench_score("gov_report", pred, ref) == pytest.approx(5 / 6)
    assert longbench_score("gov_report", pred, ref, longbench_exact=True) == LB(0.8)
    # samsum: first line only, then LongBench's ROUGE-L
    assert longbench_score("samsum", "a b a b\nc", ["a b"], longbench_exact=True) == LB(1.0)
    # lcc: 1 - 1/12 by default, fuzzywuzzy's 92 % exact
    assert longbench_score("lcc", "return a + b", ["return a - b"]) == pytest.approx(11 / 12)
    assert longbench_score("lcc", "return a + b", ["return a - b"], longbench_exact=True) == 0.92
    # metrics without an exact variant are unaffected
    assert longbench_score("hotpotqa", "black cat", ["the black cat"], longbench_exact=True) == 1.0


# ---------------------------------------------------------------------------
# LongBench classification / count / retrieval
# ---------------------------------------------------------------------------

CLASSES = ["Food", "Animal", "Sport"]


def test_classification_basic():
    assert classification_score("Food", "Food", CLASSES) == 1.0
    assert classification_score("Food or Sport", "Food", CLASSES) == 0.5
    assert classification_score("Animal", "Food", CLASSES) == 0.0
    assert classification_score("", "Food", CLASSES) == 0.0
    assert classification_score("food", "Food", CLASSES) == 0.0  # case-sensitive, as LongBench


def test_classification_drops_matches_inside_the_reference():
    # "abb" is found too, but it is a strict substring of the reference, so it is dropped
    assert classification_score("abbreviation", "abbreviation", ["abbreviation", "abb", "location"]) == 1.0
    # not dropped when it is not part of the reference: both match -> 1/2
    assert classification_score("location abbreviation", "location", ["location", "abbreviation"]) == 0.5
    # LongBench removes while iterating: "ab" is removed, so "abc" is skipped and stays -> 1/3 (not 1/2)
    assert classification_score("abcd x", "abcd", ["ab", "abc", "abcd", "x"]) == pytest.approx(1 / 3)


def test_count_score():
    assert count_score("There are 5 passages, not 3", "5") == 0.5
    assert count_score("5", "5") == 1.0
    assert count_score("no idea", "5") == 0.0
    assert count_score("15", "5") == 0.0  # whole numbers only


def test_retrieval_score():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("The answer is Paragraph 3, not 13", "Paragraph 3") == 0.5
    assert retrieval_score("none", "Paragraph 3") == 0.0
    with pytest.raises(ConfigError, match="Paragraph"):
        retrieval_score("3", "three")


# ---------------------------------------------------------------------------
# LongBench code similarity
# ---------------------------------------------------------------------------


def test_levenshtein_and_similarities():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0
    # fuzzywuzzy's ratio: LCS "ittn" = 4, indel = 13 - 8 = 5 -> 1 - 5/13 = 0.615 -> 62 %
    assert fuzz_ratio("kitten", "sitting") == 0.62
    assert fuzz_ratio("", "abc") == 0.0


def test_string_distances_on_unicode_and_empty_strings():
    # distances count code points, not UTF-8 bytes ("é" is 2 bytes)
    assert levenshtein("café", "cafe") == 1
    assert levenshtein("😀a", "a") == 1
    assert edit_similarity("naïve", "naive") == pytest.approx(0.8)
    assert edit_similarity("", "abc") == 0.0
    assert lcs_length(["the", "cat", "sat"], ["cat", "sat", "down"]) == 2  # token lists too
    # LCS "caf" = 3: indel = 8 - 6 = 2 -> 1 - 2/8 = 75 %
    assert fuzz_ratio("café", "cafe") == 0.75
    # fuzzywuzzy returns 100 for equal strings before its empty-string rule: two empty strings are 1.0
    assert fuzz_ratio("", "") == 1.0
    assert fuzz_ratio("abc", "") == 0.0
    # LCS "abcde" = 5, indel = 16 - 10 = 6 -> 62.5 %, rounded half to even as fuzzywuzzy does -> 62
    assert fuzz_ratio("abcdefgh", "abcdeXYZ") == 0.62
    # 87.5 % rounds to 88 (even): LCS 7 of lengths 8 and 8, indel 2
    assert fuzz_ratio("abcdefgh", "abcdefgX") == 0.88


def test_code_sim_first_code_line():
    assert code_sim_score("```python\n# comment\nx = foo(1)\n```", "x = foo(1)") == 1.0
    assert code_sim_score("\n\nreturn a + b\nmore", "return a - b") == pytest.approx(11 / 12)
    # LongBench skips any line that contains '#', '//' or a backtick, not only lines starting with them
    assert code_sim_score("y = 1  # set y\nz = 2", "z = 2") == 1.0
    assert code_sim_score("// c\n`x`", "abc") == 0.0  # no code line: "" against the reference
    assert code_sim_score("return a + b", "return a - b", longbench_exact=True) == pytest.approx(0.92)
    # no code line and an empty reference: "" == "" is a full match under both rules
    assert code_sim_score("# only a comment", "") == 1.0
    assert code_sim_score("# only a comment", "", longbench_exact=True) == 1.0


# ---------------------------------------------------------------------------
# LongBench task table and per-sample score
# ---------------------------------------------------------------------------


def test_longbench_metric_table():
    expected = {
        **dict.fromkeys(
            ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"], qa_f1_score
        ),
        **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], rouge_l_score),
        "trec": classification_score,
        "passage_count": count_score,
        "passage_retrieval_en": retrieval_score,
        "lcc": code_sim_score,
        "repobench-p": code_sim_score,
    }
    assert LONGBENCH_METRICS == expected and len(LONGBENCH_METRICS) == 16


def test_longbench_score_max_over_answers_and_first_line():
    assert longbench_score("hotpotqa", "black cat", ["dog", "the black cat"]) == 1.0
    assert longbench_score("hotpotqa", "black cat", ["dog"]) == 0.0
    # trec/triviaqa/samsum: only the first line counts
    assert longbench_score("trec", "\nFood\nAnimal Sport", ["Food"], all_classes=CLASSES) == 1.0
    assert longbench_score("triviaqa", "Paris\nLondon", ["London"]) == 0.0
    assert longbench_score("qasper", "Paris\nLondon", ["London"]) == pytest.approx(2 / 3)
    assert longbench_score("passage_retrieval_en", "Paragraph 2", ["Paragraph 2"]) == 1.0


def test_longbench_score_errors():
    with pytest.raises(UnknownNameError, match="hotpotqa"):
        longbench_score("hotpot_qa", "x", ["x"])
    with pytest.raises(ConfigError, match="all_classes"):
        longbench_score("trec", "Food", ["Food"])
    with pytest.raises(ConfigError):
        longbench_score("qasper", "x", [])
