"""kvframe.eval.module and kvframe.eval.generation: questions that share a context are answered from
one compressed prefill, one record per sample, never split across ranks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import kvframe.eval.generation as generation
import kvframe.eval.module as module
from kvframe.cli import main
from kvframe.errors import KVFrameError
from kvframe.eval.module import ContextGroup, StridedSampler, TaskDataModule, context_groups
from kvframe.eval.tasks.base import Sample, Task

needs_ruler = pytest.mark.skipif(importlib.util.find_spec("long_context_eval") is None, reason="RULER inputs not installed")

# per method: 1 QA context x 2 questions (RULER's 32 new tokens each)
TASKS = "tasks=[{name: ruler, subtasks: [qa_1], n_samples: 1, length: 640, questions: 2}]"


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture
def prefills(monkeypatch):
    """Counts compress_context calls of the evaluation (one per prefill), per context length."""
    calls: list[int] = []
    real = generation.compress_context

    def counting(model, comp, ids, *a, **k):
        calls.append(int(ids.shape[-1]))
        return real(model, comp, ids, *a, **k)

    monkeypatch.setattr(generation, "compress_context", counting)
    return calls


@needs_ruler
def test_grouped_run_equals_ungrouped_runs_and_prefills_each_context_once(eval_args, tmp_path, monkeypatch, prefills):
    args = [TASKS, "methods=[snapkv, tova_decode]", "max_new_tokens=4"]
    assert main(["eval", *eval_args(*args, run_name="grouped")]) == 0
    grouped = _records(tmp_path / "runs" / "grouped")
    assert len(grouped) == 2 * 2 and len(prefills) == 2  # per method: 2 samples, 1 context
    # the same run with every sample alone (no grouping): a prefill per sample
    prefills.clear()
    monkeypatch.setattr(module, "context_groups", lambda task, tok, samples: [ContextGroup(None, (s,)) for s in samples])
    assert main(["eval", *eval_args(*args, run_name="alone")]) == 0
    alone = {(r["method"], r["sample_id"]): r for r in _records(tmp_path / "runs" / "alone")}
    assert len(alone) == 4 and len(prefills) == 4
    for r in grouped:
        a = alone[(r["method"], r["sample_id"])]
        assert (r["prediction"], r["score"], r["cache_content_slots"], r["prompt_tokens"]) == (
            a["prediction"], a["score"], a["cache_content_slots"], a["prompt_tokens"]
        ), r["sample_id"]
        assert r["context_group_size"] == 2 and a["context_group_size"] == 1 and len(r["context_group"]) == 16
        assert r["fingerprint"] == a["fingerprint"]
    # the records of a group name it and carry the one shared prefill time
    by_group: dict[tuple[str, str], list[dict]] = {}
    for r in grouped:
        by_group.setdefault((r["method"], r["context_group"]), []).append(r)
    assert len(by_group) == 2 and all(len(g) == 2 for g in by_group.values())
    for g in by_group.values():
        assert len({r["prefill_s"] for r in g}) == 1 and len({r["sample_id"].rsplit("-q", 1)[0] for r in g}) == 1


@needs_ruler
def test_resume_answers_only_the_pending_questions_of_a_group(eval_args, tmp_path, prefills):
    args = eval_args(TASKS, "methods=[knorm]", "max_new_tokens=4")
    assert main(["eval", *args]) == 0
    preds = tmp_path / "runs" / "r" / "predictions.jsonl"
    lines = preds.read_text().splitlines()
    first = {json.loads(x)["sample_id"]: json.loads(x) for x in lines}
    # drop the second question: it is pending again, the first one is not
    dropped = [x for x in lines if json.loads(x)["sample_id"].endswith("-0-q1")]
    assert len(lines) == 2 and len(dropped) == 1
    preds.write_text("".join(x + "\n" for x in lines if x not in dropped))
    prefills.clear()
    assert main(["eval", *args]) == 0
    assert prefills == [first[json.loads(dropped[0])["sample_id"]]["prefill_tokens"]]  # one prefill, of that context
    after = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(after) == len(lines)
    for r in after[-1:]:
        assert r["sample_id"] in {json.loads(x)["sample_id"] for x in dropped} and r["context_group_size"] == 1
        assert r["prediction"] == first[r["sample_id"]]["prediction"]


@needs_ruler
def test_query_aware_compresses_every_question_with_its_context(eval_args, tmp_path, prefills):
    assert main(["eval", *eval_args(TASKS, "methods=[knorm]", "max_new_tokens=2", "mode=query_aware")]) == 0
    records = _records(tmp_path / "runs" / "r")
    assert len(records) == 2 and len(prefills) == 2
    assert all("context_group" not in r and r["prefill_tokens"] == r["prompt_tokens"] - 1 for r in records)


class _Shared(Task):
    name = "shared"

    def __init__(self, kind: str = "generation"):
        self.kind = kind

    def samples(self, tokenizer):
        contexts = ["alpha " * 5, "beta " * 5, "gamma " * 5]
        return [Sample(f"s{i}", contexts[i % 3].strip(), f"question {i}?", ("a",)) for i in range(10)]


def test_groups_follow_the_prompt_prefix_and_are_never_split_across_ranks(smollm2_tokenizer):
    task = _Shared()
    dm = TaskDataModule(task, smollm2_tokenizer, done_ids={"s4"})
    dm.setup()
    assert [[s.id for s in g.samples] for g in dm.groups] == [["s0", "s3", "s6", "s9"], ["s1", "s7"], ["s2", "s5", "s8"]]
    assert len({g.key for g in dm.groups}) == 3
    assert dm.groups[0].key == generation.context_key(smollm2_tokenizer, task.samples(None)[3])
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
            for batch in dm.test_dataloader():
                assert len(batch) == 1 and isinstance(batch[0], ContextGroup)
                seen.extend(s.id for s in batch[0].samples)
        assert sorted(seen) == sorted(s.id for s in dm.pending)  # every pending sample once; groups whole
    assert list(StridedSampler(5, 1, 2)) == [1, 3]
    # perplexity streams are never grouped
    assert [len(g.samples) for g in context_groups(_Shared("perplexity"), smollm2_tokenizer, task.samples(None))] == [1] * 10


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason='datasets not installed (pip install "kvframe[hub]")')
def test_longbench_rows_about_one_document_form_one_group(tmp_path, smollm2_tokenizer, monkeypatch):
    from kvframe.eval.tasks.hub import LongBenchTask

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    doc, other = "Passage 1:\nParis is the capital of France.", "Passage 1:\nThe cat sat on the mat."
    rows = [(doc, "What is the capital of France?"), (other, "Where did the cat sit?"), (doc, "Which country is Paris in?")]
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text("".join(
        json.dumps({"input": q, "context": c, "answers": ["x"], "length": 7, "dataset": "hotpotqa", "language": "en",
                    "all_classes": None, "_id": f"id-{i}"}) + "\n" for i, (c, q) in enumerate(rows)
    ))
    task = LongBenchTask("hotpotqa", data_files=str(path), cache_dir=str(tmp_path / "cache"))
    groups = context_groups(task, smollm2_tokenizer, task.samples(smollm2_tokenizer))
    assert [[s.id.rsplit("-", 1)[1] for s in g.samples] for g in groups] == [["0", "2"], ["1"]]


def test_answer_group_refuses_samples_it_cannot_answer_from_one_prefill(smollm2_tokenizer):
    tok = smollm2_tokenizer
    a, b = Sample("a", "context one", "q?"), Sample("b", "context two", "q?")
    with pytest.raises(KVFrameError, match="2 samples but 1 max_new_tokens; accepted: one per sample"):
        next(generation.answer_group(None, tok, None, [a, b], [4]))
    with pytest.raises(KVFrameError, match="query_aware mode .* got 2 samples \\(accepted: one\\)"):
        next(generation.answer_group(None, tok, None, [a, a], 4, "query_aware"))
    with pytest.raises(KVFrameError, match=r"samples \['a', 'b'\] do not share one context"):
        next(generation.answer_group(None, tok, None, [a, b], 4))
