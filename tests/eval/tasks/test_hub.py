"""Hub loaders on tiny local fixtures in the exact hub formats (no network: everything offline)."""

from __future__ import annotations

import json
import os
import re
import sys
from types import SimpleNamespace

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from kvframe.errors import ConfigError  # noqa: E402
from kvframe.eval.tasks import hub  # noqa: E402
from kvframe.eval.tasks.base import Sample, content_hash  # noqa: E402
from kvframe.eval.tasks.hub import (  # noqa: E402
    LONGBENCH_DATASETS,
    LONGBENCH_MAXLEN,
    LONGBENCH_PROMPTS,
    InfiniteBenchTask,
    LongBenchTask,
    PG19Task,
    RulerHubTask,
    truncate_middle,
)

needs_datasets = pytest.mark.skipif(
    __import__("importlib").util.find_spec("datasets") is None, reason='datasets not installed (pip install "kvframe[hub]")'
)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class WordTokenizer:
    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = []
        for w in re.findall(r"\S+", text):
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i] for i in ids)


# LongBench's original (unsplit) templates for three datasets, as in its config/dataset2prompt.json
ORIGINAL = {
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
}


def _lb_row(dataset, i, context, inp, answers, all_classes=None):
    return {"input": inp, "context": context, "answers": answers, "length": len(context.split()), "dataset": dataset,
            "language": "en", "all_classes": all_classes, "_id": f"{dataset}-id-{i:04d}"}


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


# ----------------------------------------------------------------------------- optional dependency
def test_missing_datasets_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ConfigError, match=re.escape('pip install "kvframe[hub]"')):
        hub.require_datasets()
    path = _jsonl(tmp_path / "hotpotqa.jsonl", [_lb_row("hotpotqa", 0, "c", "q", ["a"])])
    with pytest.raises(ConfigError, match="kvframe\\[hub\\]"):
        LongBenchTask("hotpotqa", data_files=str(path)).samples()
    with pytest.raises(ConfigError, match="kvframe\\[hub\\]"):
        InfiniteBenchTask(subset="passkey", data_files=str(path)).samples()


def test_importing_the_module_does_not_import_datasets():
    import subprocess

    code = "import sys, kvframe.eval.tasks.hub, kvframe.eval.tasks.perplexity; print('datasets' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_names_are_validated():
    with pytest.raises(ConfigError, match="hotpotqa"):
        LongBenchTask("hotpotqq")
    with pytest.raises(ConfigError, match="En.QA"):
        InfiniteBenchTask(subset="En.QQ")
    with pytest.raises(ConfigError, match="data_files"):
        RulerHubTask()
    with pytest.raises(ConfigError):
        RulerHubTask(data_files="x/validation.jsonl", task="unknown_task")


# ----------------------------------------------------------------------------- LongBench
def test_longbench_tables_cover_the_16_english_datasets():
    assert len(LONGBENCH_DATASETS) == 16
    assert set(LONGBENCH_PROMPTS) == set(LONGBENCH_MAXLEN) == set(LONGBENCH_DATASETS)
    from kvframe.eval.metrics import LONGBENCH_METRICS

    assert set(LONGBENCH_METRICS) == set(LONGBENCH_DATASETS)
    for ds, (ctx, q) in LONGBENCH_PROMPTS.items():
        assert "{context}" in ctx and "{context}" not in q and "{input}" not in ctx, ds


@needs_datasets
def test_longbench_samples_and_scores(tmp_path, cache):
    rows = [
        _lb_row("hotpotqa", 0, "Passage 1:\nParis is the capital of France.", "What is the capital of France?", ["Paris"]),
        _lb_row("hotpotqa", 1, "Passage 1:\nThe cat sat {on} the mat.", "Where did the cat sit?", ["the mat", "on the mat"]),
        _lb_row("hotpotqa", 2, "unused", "unused", ["x"]),
    ]
    path = _jsonl(tmp_path / "lb" / "hotpotqa.jsonl", rows)
    task = LongBenchTask("hotpotqa", n_samples=2, data_files=str(path), cache_dir=cache)
    task.check()
    assert task.name == "longbench_hotpotqa" and task.metric == "qa_f1_score" and task.max_new_tokens == 32
    samples = task.samples()
    assert len(samples) == 2 and samples[0].id == "longbench-hotpotqa-hotpotqa-id-0000"
    for s, row in zip(samples, rows):
        assert s.context + s.question == ORIGINAL["hotpotqa"].format(context=row["context"], input=row["input"])
        assert row["input"] not in s.context and s.context.endswith(row["context"])
        assert s.answers == tuple(row["answers"])
        assert s.meta["max_new_tokens"] == 32 and s.meta["chat"] is True and s.meta["join"] == ""
        assert s.meta["metric"] == "qa_f1_score" and s.meta["length"] == row["length"]
    assert content_hash(samples) == content_hash(LongBenchTask("hotpotqa", n_samples=2, data_files=str(path), cache_dir=cache).samples())
    assert task.score("Paris", samples[0]) == 1.0
    assert task.score("Paris, France.", samples[0]) == pytest.approx(2 / 3)  # F1 of {paris, france} vs {paris}
    assert task.score("on the mat", samples[1]) == 1.0  # max over references
    assert task.score("London", samples[0]) == 0.0


@needs_datasets
def test_longbench_classification_retrieval_and_code(tmp_path, cache):
    trec = _jsonl(tmp_path / "trec.jsonl", [
        _lb_row("trec", 0, "Question: Who wrote Hamlet?\nType: Individual", "Question: What is a dog?\nType:",
                ["Animal"], ["Animal", "Individual", "Food"]),
    ])
    t = LongBenchTask("trec", data_files=str(trec), cache_dir=cache)
    (s,) = t.samples()
    assert s.context + s.question == ORIGINAL["trec"].format(context=s.context.split("\n\n", 1)[1], input="Question: What is a dog?\nType:")
    assert s.meta["chat"] is False and s.meta["all_classes"] == ["Animal", "Individual", "Food"] and s.meta["max_new_tokens"] == 64
    assert t.score("Animal", s) == 1.0
    assert t.score("Animal\nIndividual", s) == 1.0  # only the first line counts for trec
    assert t.score("Animal or Food", s) == 0.5
    assert t.score("Individual", s) == 0.0

    pr = _jsonl(tmp_path / "pr.jsonl", [_lb_row("passage_retrieval_en", 0, "Paragraph 1: a\n\nParagraph 2: b", "abstract b", ["Paragraph 2"])])
    t = LongBenchTask("passage_retrieval_en", data_files=str(pr), cache_dir=cache)
    (s,) = t.samples()
    assert s.context + s.question == ORIGINAL["passage_retrieval_en"].format(context="Paragraph 1: a\n\nParagraph 2: b", input="abstract b")
    assert t.score("Paragraph 2", s) == 1.0 and t.score("Paragraph 1", s) == 0.0

    lcc = _jsonl(tmp_path / "lcc.jsonl", [_lb_row("lcc", 0, "def f(x):\n", "", ["    return x + 1"])])
    t = LongBenchTask("lcc", data_files=str(lcc), cache_dir=cache)
    (s,) = t.samples()
    assert s.context + s.question == ORIGINAL["lcc"].format(context="def f(x):\n")
    assert s.question == "Next line of code:\n" and s.meta["chat"] is False
    assert t.score("    return x + 1\nmore", s) == 1.0
    assert 0.0 < t.score("    return x - 1", s) < 1.0


@needs_datasets
def test_longbench_script_repo_falls_back_to_data_zip(monkeypatch, tmp_path, cache):
    """datasets >= 4 refuses THUDM/LongBench's loading script; the loader then reads its data.zip."""
    import zipfile

    import datasets
    import huggingface_hub

    archive = tmp_path / "blobs" / "0123abcd"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/musique.jsonl", json.dumps(_lb_row("musique", 5, "ctx", "q?", ["ans"])) + "\n")
    real = datasets.load_dataset
    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append(path)
        if path == "THUDM/LongBench":
            raise RuntimeError("Dataset scripts are no longer supported, but found LongBench.py")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, repo_type: str(archive))
    monkeypatch.setenv("KVFRAME_CACHE_DIR", str(tmp_path / "kvcache"))
    (s,) = LongBenchTask("musique", cache_dir=cache).samples()
    assert calls == ["THUDM/LongBench", "json"]
    assert s.id == "longbench-musique-musique-id-0005" and s.answers == ("ans",)
    assert (tmp_path / "kvcache" / "longbench" / "0123abcd" / "musique.jsonl").is_file()


def test_truncate_middle_keeps_head_tail_and_question():
    tok = WordTokenizer()
    s = Sample(id="x", context=" ".join(f"c{i}" for i in range(20)), question="q1 q2", answers=("a",))
    assert truncate_middle(tok, s, 30) is s
    t = truncate_middle(tok, s, 10)
    assert t.context == "c0 c1 c2 c3 c4 c17 c18 c19" and t.question == s.question and t.meta["truncated_to"] == 10


# ----------------------------------------------------------------------------- RULER
@needs_datasets
def test_ruler_jsonl_samples_and_string_match(tmp_path, cache):
    niah = [
        {"index": 0, "input": "Some special magic numbers are hidden within the following text.\nOne of the special magic numbers for "
         "alpha is: 1234567.\nWhat are all the special magic numbers for alpha mentioned in the provided text?",
         "outputs": ["1234567"], "length": 40},
        {"index": 1, "input": "Text with two needles 1111111 and 2222222.\nWhat are all the special magic numbers for beta?",
         "outputs": ["1111111", "2222222"], "length": 30},
    ]
    path = _jsonl(tmp_path / "ruler" / "niah_multivalue" / "validation.jsonl", niah)
    task = RulerHubTask(data_files=str(path), cache_dir=cache)
    assert task.task == "niah_multivalue" and task.match == "all"
    assert task.name == "ruler_hub_niah_multivalue" and task.metric == "string_match_all"
    s0, s1 = task.samples()
    assert s0.context + s0.question == niah[0]["input"]
    assert s0.question == "\nWhat are all the special magic numbers for alpha mentioned in the provided text?"
    assert s0.id == "ruler-niah_multivalue-0" and s0.meta["max_new_tokens"] == 128 and s0.meta["length"] == 40
    assert task.score("The numbers are 1234567.", s0) == 1.0
    assert task.score("1111111 only", s1) == 0.5  # string_match_all: fraction of references found

    qa = [{"index": 7, "input": "Document 1: Rome.\n\nQuestion: capital of Italy?", "outputs": ["Rome", "Roma"],
           "length": 12, "answer_prefix": " Answer:"}]
    path = _jsonl(tmp_path / "ruler" / "qa_1" / "validation.jsonl", qa)
    task = RulerHubTask(data_files=[str(path)], cache_dir=cache)
    (s,) = task.samples()
    assert task.match == "part" and s.meta["max_new_tokens"] == 32
    assert s.context + s.question == qa[0]["input"] + " Answer:"
    assert task.score("roma", s) == 1.0  # string_match_part: any reference, case-insensitive
    assert task.score("Milan", s) == 0.0


# ----------------------------------------------------------------------------- PG19
@needs_datasets
def test_pg19_streams_from_local_files(tmp_path, cache):
    books = [
        {"short_book_title": "Short", "publication_date": 1900, "url": "u0", "text": "tiny book"},
        {"short_book_title": "Long A", "publication_date": 1901, "url": "u1", "text": " ".join(f"a{i}" for i in range(400))},
        {"short_book_title": "Long B", "publication_date": 1902, "url": "u2", "text": " ".join(f"b{i}" for i in range(300))},
    ]
    path = _jsonl(tmp_path / "pg19" / "test.jsonl", books)
    tok = WordTokenizer()
    task = PG19Task(n_samples=2, length=120, prefill=16, data_files=str(path), cache_dir=cache)
    assert task.kind == "perplexity"
    samples = task.samples(tok)
    assert [s.meta["short_book_title"] for s in samples] == ["Long A", "Long B"]  # the short book is skipped
    for s in samples:
        assert s.meta["n_tokens"] >= 120 and task.token_ids(tok, s).shape == (1, 120)
    assert content_hash(samples) == content_hash(PG19Task(n_samples=2, length=120, prefill=16, data_files=str(path), cache_dir=cache).samples(tok))
    with pytest.raises(ConfigError, match="only 2"):
        PG19Task(n_samples=3, length=120, data_files=str(path), cache_dir=cache).samples(tok)


# ----------------------------------------------------------------------------- InfiniteBench
def _ib_row(i, context, inp, answer, options=()):
    return {"id": i, "context": context, "input": inp, "answer": list(answer), "options": list(options)}


@needs_datasets
def test_infinitebench_passkey_and_kv(tmp_path, cache):
    path = _jsonl(tmp_path / "ib" / "passkey.jsonl", [
        _ib_row(0, "grass. The pass key is 71432. Remember it. grass.", "What is the pass key?", ["71432"]),
    ])
    task = InfiniteBenchTask(subset="passkey", data_files=str(path), cache_dir=cache)
    (s,) = task.samples()
    assert s.context.endswith("grass.") and s.question == "\n\nWhat is the pass key?" and s.meta["max_new_tokens"] == 6
    assert s.context + s.question == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
        "about the important information there.\n\ngrass. The pass key is 71432. Remember it. grass.\n\nWhat is the pass key?"
    )
    assert task.score("The pass key is 71432.", s) == 1.0
    assert task.score("714320", s) == 0.0 and task.score("12 then 71432", s) == 0.0  # the first integer counts

    path = _jsonl(tmp_path / "ib" / "kv.jsonl", [
        _ib_row(3, '{"a1b2": "c3d4-e5", "x": "y"}', 'Key: "a1b2"\nThe value associated with the specified key is: ', ["c3d4-e5"]),
    ])
    task = InfiniteBenchTask(subset="Retrieve.KV", data_files=str(path), cache_dir=cache)
    (s,) = task.samples()
    assert s.id == "infinitebench-kv_retrieval-3"
    assert task.score('The value is "c3d4-e5".', s) == 1.0
    assert task.score("c3d4", s) == 0.0


@needs_datasets
def test_infinitebench_choice_and_qa(tmp_path, cache):
    options = ["Red house", "Blue car", "Green tree", "Yellow sun"]
    path = _jsonl(tmp_path / "ib" / "choice.jsonl", [_ib_row(0, "A book.", "What did she see?", ["Green tree"], options)])
    task = InfiniteBenchTask(subset="En.MC", data_files=str(path), cache_dir=cache)
    (s,) = task.samples()
    assert s.meta["gold_letter"] == "C" and s.question.endswith("\nA. Red house\nB. Blue car\nC. Green tree\nD. Yellow sun")
    assert task.score("C", s) == 1.0 and task.score("C. Green tree", s) == 1.0
    assert task.score("B", s) == 0.0
    assert task.score("I think the answer is: C", s) == 1.0
    assert task.score("the answer is Green tree", s) == 1.0
    assert task.score("Hmm, maybe D here", s) == 0.0
    assert task.score("", s) == 0.0

    path = _jsonl(tmp_path / "ib" / "qa.jsonl", [_ib_row(1, "A book.", "Who is the hero?", ["John Smith", "Smith"])])
    task = InfiniteBenchTask(subset="En.QA", data_files=str(path), cache_dir=cache)
    (s,) = task.samples()
    assert s.question == "\n\nQuestion: Who is the hero?\n\nBe very concise." and s.meta["max_new_tokens"] == 40
    assert task.score("John Smith", s) == 1.0
    assert task.score("Mr. Smith", s) == pytest.approx(2 / 3)  # best of the two references
    assert task.score("Nobody", s) == 0.0


@needs_datasets
def test_parquet_and_split_dict_data_files(tmp_path, cache):
    import datasets

    rows = [_lb_row("qasper", i, f"article {i}", f"question {i}", ["yes"]) for i in range(3)]
    pq = tmp_path / "qasper.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    task = LongBenchTask("qasper", data_files={"test": str(pq)}, cache_dir=cache)
    samples = task.samples()
    assert [s.id for s in samples] == [f"longbench-qasper-qasper-id-{i:04d}" for i in range(3)]
    with pytest.raises(ConfigError, match="split"):
        LongBenchTask("qasper", split="validation", data_files={"test": str(pq)}, cache_dir=cache).samples()
    with pytest.raises(ConfigError, match="not found"):
        LongBenchTask("qasper", data_files=str(tmp_path / "missing.jsonl"), cache_dir=cache).samples()
    with pytest.raises(ConfigError, match="not found"):
        LongBenchTask("qasper", data_files=str(tmp_path / "missing.jsonl")).check()  # before any model loads


@needs_datasets
def test_tasks_build_by_name_from_a_config(tmp_path, cache):
    from kvframe.eval.tasks import make_task

    path = _jsonl(tmp_path / "ib" / "passkey.jsonl", [_ib_row(0, "ctx 123", "What is the pass key?", ["123"])])
    task = make_task({"name": "infinitebench", "subset": "passkey", "data_files": str(path), "cache_dir": cache})
    assert isinstance(task, InfiniteBenchTask) and task.name == "infinitebench_passkey"
    assert [s.answers for s in task.samples()] == [("123",)]
    with pytest.raises(ConfigError, match="not found"):
        make_task({"name": "pg19", "data_files": str(tmp_path / "nope.parquet")})


@needs_datasets
def test_longbench_scores_are_longbenchs_own_unless_exact_is_off(tmp_path, cache):
    """ROUGE-L tasks score as LongBench's script does by default (the ``rouge`` package: 0.8 here),
    and as plain ROUGE-L (5/6: the LCS of 5 of 6 words) with ``exact: false``."""
    rows = _jsonl(tmp_path / "gov.jsonl", [_lb_row("gov_report", 0, "A report.", "", ["the cat sat on the mat"])])
    exact = LongBenchTask("gov_report", data_files=str(rows), cache_dir=cache)
    plain = LongBenchTask("gov_report", data_files=str(rows), cache_dir=cache, exact=False)
    (s,) = exact.samples()
    assert exact.score("the cat lay on the mat", s) == pytest.approx(0.8, abs=1e-7)
    assert plain.score("the cat lay on the mat", s) == pytest.approx(5 / 6, abs=1e-12)
    with pytest.raises(ConfigError, match="exact='yes'"):
        LongBenchTask("gov_report", data_files=str(rows), exact="yes")
